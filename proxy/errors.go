package proxy

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"

	"github.com/vigthoria/caddy-vigthoria/api"
	"go.uber.org/zap"
)

// Upstream failures. Their messages are fixed on purpose: nothing of the
// upstream's own answer (which may name the server key) reaches the client.
var (
	errUpstreamUnavailable = &api.Error{Status: http.StatusBadGateway, Type: api.TypeAPI, Code: api.CodeUpstreamUnavailable, Message: "The upstream API could not be reached. Please try again later."}
	errUpstreamTimeout     = &api.Error{Status: http.StatusGatewayTimeout, Type: api.TypeAPI, Code: api.CodeUpstreamTimeout, Message: "The upstream API did not answer in time. Please try again later."}
	// errUpstreamRefused is an upstream 401 or 403 about the request, not
	// the server key, which works: 403 for the caller, whose own key is
	// fine, and nothing of the upstream's body, which may name the key.
	errUpstreamRefused   = &api.Error{Status: http.StatusForbidden, Type: api.TypeInvalidRequest, Code: api.CodeUpstreamError, Message: "The upstream API refused the request with its server key, which serves other requests: it may not allow this model or endpoint."}
	errUpstreamAuth      = &api.Error{Status: http.StatusBadGateway, Type: api.TypeAPI, Code: api.CodeUpstreamAuth, Message: "The proxy could not authenticate with the upstream API. The operator has been notified."}
	errUpstreamBadAnswer = &api.Error{Status: http.StatusBadGateway, Type: api.TypeAPI, Code: api.CodeUpstreamBadAnswer, Message: "The upstream API sent an answer that is not valid JSON. Please try again later."}
	errUpstreamStream    = &api.Error{Status: http.StatusBadGateway, Type: api.TypeAPI, Code: api.CodeUpstreamStream, Message: "The upstream API failed while streaming the answer. The answer is incomplete."}
	// errModelNotAvailable is a model no server key serves: the operator's
	// api_keys globs leave it out.
	errModelNotAvailable = &api.Error{Status: http.StatusNotFound, Type: api.TypeInvalidRequest, Code: api.CodeModelNotAvailable, Message: "The model is not available through this proxy: none of its server keys serves it."}
	errUpstreamNotAnswer = &api.Error{Status: http.StatusBadGateway, Type: api.TypeAPI, Code: api.CodeUpstreamBadAnswer, Message: "The upstream API sent something other than an answer of the API (a redirect, or content of another type). Please try again later."}
)

// errNotAnAnswer is an upstream answering with a redirect, or a 2xx of
// another Content-Type than the API's for the request.
var errNotAnAnswer = errors.New("upstream answer is not of the API's form")

// maxErrorBody bounds the upstream error body that is read, checked and
// passed on; a longer one is replaced by the proxy's own.
const maxErrorBody = 16 << 10

// errorAnswer returns the body of an upstream error answer (4xx or 5xx,
// but 401 and 403), setting res's status and headers for it. A 4xx in
// the API's shape (a JSON object whose "error" is an object, up to 16 KiB)
// is passed on as it came: the caller's request is what it speaks of,
// unless names finds a server key in it. Any other 4xx, and every 5xx,
// whose body may be a page naming the upstream's internals, is replaced
// by the proxy's own error: the same 4xx status, or for a 5xx its status
// if the SDKs know it (500, 502, 503, 504; they retry those), else 502.
func errorAnswer(res *http.Response, names func([]byte) bool, logger *zap.Logger) io.ReadCloser {
	status := res.StatusCode
	var keep *checkedAnswer
	if status < 500 && isJSON(res.Header.Get("Content-Type")) {
		if keep = readError(res); keep != nil && names(keep.rest) {
			logger.Warn("an upstream error answer named the server key; replaced by the proxy's own", zap.Int("upstream_status", status))
			keep = nil
		}
	}
	res.Body.Close()
	if keep != nil {
		res.ContentLength = int64(len(keep.rest))
		res.Header.Set("Content-Length", strconv.Itoa(len(keep.rest)))
		return keep
	}
	e := &api.Error{Status: status, Type: api.TypeInvalidRequest, Code: api.CodeUpstreamError,
		Message: "The upstream API refused the request with status " + strconv.Itoa(status) + "."}
	if status >= 500 {
		switch status {
		case http.StatusInternalServerError, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		default:
			e.Status = http.StatusBadGateway
		}
		e.Type = api.TypeAPI
		e.Message = "The upstream API failed with status " + strconv.Itoa(status) + ". Please try again later."
	}
	if ce := logger.Check(zap.InfoLevel, "upstream error answer replaced by the proxy's own"); ce != nil {
		ce.Write(zap.Int("upstream_status", status), zap.String("content_type", res.Header.Get("Content-Type")))
	}
	body := append(e.AppendJSON(make([]byte, 0, 128+len(e.Message))), '\n')
	res.StatusCode, res.Status = e.Status, ""
	res.ContentLength = int64(len(body))
	h := res.Header
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Del("Content-Encoding")
	h.Del("Content-Language")
	return &checkedAnswer{rest: body}
}

// readError reads a 4xx JSON body, up to maxErrorBody, and returns it if
// it is in the API's error shape, else nil. Its few KiB are not counted
// in the answers' budget: they live as long as one write to the caller.
func readError(res *http.Response) *checkedAnswer {
	buf, err := io.ReadAll(io.LimitReader(res.Body, maxErrorBody+1))
	if err != nil || len(buf) > maxErrorBody || !apiErrorShape(buf) {
		return nil
	}
	return &checkedAnswer{rest: buf}
}

// apiErrorShape reports whether b is a JSON object whose "error" is an
// object, as the API's errors are.
func apiErrorShape(b []byte) bool {
	var doc struct {
		Error json.RawMessage `json:"error"`
	}
	return json.Unmarshal(b, &doc) == nil && len(doc.Error) > 0 && doc.Error[0] == '{'
}
