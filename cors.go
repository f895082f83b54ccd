package vigthoria

import (
	"net/http"
	"slices"
	"strings"

	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// corsExposed are the response headers browser code may read: the
// caller's limits, the upstream's, and what to wait.
var corsExposed = strings.Join([]string{
	"X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Requests", "X-Ratelimit-Reset-Requests",
	"X-Ratelimit-Limit-Tokens", "X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Reset-Tokens",
	"Ratelimit", "Ratelimit-Policy", "X-Ratelimit-Limit", "X-Ratelimit-Remaining", "X-Ratelimit-Reset",
	"Retry-After", "X-Should-Retry", "X-Request-Id", "X-Cache",
}, ", ")

// corsMaxAge is how long a browser may reuse a preflight's answer.
const corsMaxAge = "600"

var errOriginNotAllowed = &proxy.APIError{
	Status:  http.StatusForbidden,
	Type:    "permission_error",
	Code:    "origin_not_allowed",
	Message: "Requests from this web origin are not allowed by this proxy.",
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
	ep, apiErr := proxy.Route(method, routePath(r))
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
