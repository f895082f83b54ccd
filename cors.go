package vigthoria

import (
	"net/http"
	"slices"
	"strings"

	"github.com/vigthoria/caddy-vigthoria/api"
)

// corsExposed are the response headers browser code may read: the
// caller's limits, the upstream's, what to wait and what it waited.
var corsExposed = strings.Join([]string{
	"X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Requests", "X-Ratelimit-Reset-Requests",
	"X-Ratelimit-Limit-Tokens", "X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Reset-Tokens",
	"Ratelimit", "Ratelimit-Policy", "X-Ratelimit-Limit", "X-Ratelimit-Remaining", "X-Ratelimit-Reset",
	"Retry-After", "X-Should-Retry", "X-Request-Id", "X-Cache", queueWaitHeader,
}, ", ")

// corsMaxAge is how long a browser may reuse a preflight's answer.
const corsMaxAge = "600"

var errOriginNotAllowed = &api.Error{
	Status:  http.StatusForbidden,
	Type:    "permission_error",
	Code:    "origin_not_allowed",
	Message: "Requests from this web origin are not allowed by this proxy.",
}

// errCrossSite refuses a page of another site calling as a caller its
// browser identifies by itself.
var errCrossSite = func() *api.Error {
	e := *errOriginNotAllowed
	e.Message = "Requests from other web origins may not call as a user signed in by cookie, basic_auth or address: list the origin in this proxy's cors, or send a client key or token as Authorization: Bearer."
	return &e
}()

var errUnsupportedMediaType = &api.Error{
	Status:  http.StatusUnsupportedMediaType,
	Type:    api.TypeInvalidRequest,
	Code:    "unsupported_media_type",
	Message: "Send the request body as JSON, with the header Content-Type: application/json.",
}

// jsonContentType reports whether a request body is declared JSON: one
// Content-Type of application/json (any case, any parameters), or none.
// An HTML form always declares one of its three types, none of them
// JSON, so a page of another site can send JSON only by a script — which
// sends Origin, and a preflight for application/json.
func jsonContentType(h http.Header) bool {
	v := h["Content-Type"]
	switch len(v) {
	case 0:
		return true
	case 1:
		mt, _, _ := strings.Cut(v[0], ";")
		return strings.EqualFold(strings.TrimSpace(mt), "application/json")
	}
	return false
}

// crossSite reports whether r comes from a web page of an origin other
// than the site's own and those of cors: its Origin (its host and port
// against the request's Host, whatever the scheme, so that TLS ended in
// front of Caddy changes nothing), or, without Origin (images, scripts,
// no-cors reads), Sec-Fetch-Site. Requests without either are not
// browsers' (servers, SDKs) or navigations the user made.
func crossSite(r *http.Request, cors []string) bool {
	if origin := r.Header.Get("Origin"); origin != "" {
		_, host, ok := strings.Cut(origin, "://")
		return !(ok && strings.EqualFold(host, r.Host)) && !slices.Contains(cors, origin)
	}
	switch r.Header.Get("Sec-Fetch-Site") {
	case "cross-site", "same-site":
		return true
	}
	return false
}

// cors applies the browser rules before anything else: an allowed origin
// gets its headers on every answer, errors included; another origin is
// refused, so that no other site spends a tier from its visitors'
// browsers; a preflight is answered here, never forwarded or counted.
// Requests without Origin (servers, SDKs) pass untouched. It reports
// whether the request was answered.
func (h *Handler) cors(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if len(h.CORS) == 0 || origin == "" {
		return false
	}
	hdr := w.Header()
	hdr.Add("Vary", "Origin")
	if !slices.Contains(h.CORS, origin) {
		errOriginNotAllowed.Write(w)
		return true
	}
	hdr.Set("Access-Control-Allow-Origin", origin)
	hdr.Set("Access-Control-Expose-Headers", corsExposed)

	method := r.Header.Get("Access-Control-Request-Method")
	if r.Method != http.MethodOptions || method == "" {
		return false
	}
	ep, apiErr := api.Route(method, routePath(r))
	if apiErr != nil {
		apiErr.Write(w)
		return true
	}
	hdr.Set("Access-Control-Allow-Methods", ep.Method)
	if asked := r.Header.Get("Access-Control-Request-Headers"); asked != "" {
		// Any header may come: credentials other than the key are
		// stripped before the upstream anyway.
		hdr.Set("Access-Control-Allow-Headers", asked)
	}
	hdr.Set("Access-Control-Max-Age", corsMaxAge)
	hdr.Add("Vary", "Access-Control-Request-Method")
	hdr.Add("Vary", "Access-Control-Request-Headers")
	w.WriteHeader(http.StatusNoContent)
	return true
}

// errKeyOriginNotAllowed refuses a request from a web origin that the
// caller's key is not bound to.
var errKeyOriginNotAllowed = func() *api.Error {
	e := *errOriginNotAllowed
	e.Message = "This key may not be used from this web origin."
	return &e
}()
