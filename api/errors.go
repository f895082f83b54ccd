// Package api is the API's side of the proxy's answers: the error shape
// {"error":{"message","type","code"}} and every refusal the proxy makes,
// the table of the endpoints it serves, and the shape of a credential
// that must never be repeated. It owns no state and imports the standard
// library only, so that every other package may speak in its terms.
package api

import (
	"net/http"
	"strconv"
	"time"
)

// Error types and codes of the proxy's own answers, in the upstream API's
// vocabulary so that clients written against it branch on them unchanged.
const (
	TypeInvalidRequest = "invalid_request_error"
	TypeAPI            = "api_error"

	CodeUnknownURL          = "unknown_url"
	CodeMethodNotAllowed    = "method_not_allowed"
	CodeRequestTooLarge     = "request_too_large"
	CodeUpstreamUnavailable = "upstream_unavailable"
	CodeUpstreamTimeout     = "upstream_timeout"
	CodeUpstreamAuth        = "upstream_auth_failed"
	CodeUpstreamStream      = "upstream_stream_failed"
	CodeUpstreamBadAnswer   = "upstream_bad_response"
	CodeUpstreamError       = "upstream_error"
	CodeModelNotAvailable   = "model_not_available"
)

// Error is an error answered by the proxy itself, written in the
// upstream API's shape: {"error":{"message","type","code"}}. Its fields
// beside the body say which headers go with it, so that the code that
// decides a refusal returns it whole and only the serving code writes.
type Error struct {
	Status  int
	Type    string
	Code    string
	Message string
	Allow   string // methods for the Allow header of a 405

	RetryAfter   int  // whole seconds for Retry-After; 0: none
	NoRetry      bool // X-Should-Retry: false, which the SDKs honour
	Authenticate bool // WWW-Authenticate: the challenge of a 401
}

func (e *Error) Error() string { return e.Message }

// Write sends e as the whole response.
func (e *Error) Write(w http.ResponseWriter) {
	body := e.AppendJSON(make([]byte, 0, 128+len(e.Message)))
	body = append(body, '\n')
	h := w.Header()
	e.SetHeaders(h)
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Del("Content-Encoding")
	w.WriteHeader(e.Status)
	_, _ = w.Write(body)
}

// SetHeaders sets the headers that go with e.
func (e *Error) SetHeaders(h http.Header) {
	if e.Allow != "" {
		h.Set("Allow", e.Allow)
	}
	if e.RetryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	if e.NoRetry {
		h.Set("X-Should-Retry", "false")
	}
	if e.Authenticate {
		h.Set("Www-Authenticate", `Bearer realm="vigthoria"`)
	}
}

// AppendJSON appends {"error":{…}} to b without reflection.
func (e *Error) AppendJSON(b []byte) []byte {
	b = append(b, `{"error":{"message":`...)
	b = strconv.AppendQuote(b, e.Message)
	b = append(b, `,"type":`...)
	b = strconv.AppendQuote(b, e.Type)
	b = append(b, `,"code":`...)
	b = strconv.AppendQuote(b, e.Code)
	return append(b, "}}"...)
}

// maxEchoedPath bounds how much of a caller's path an error repeats.
const maxEchoedPath = 200

// NotFound answers a path the proxy does not serve.
func NotFound(method, path string) *Error {
	if HasCredential(path) {
		path = RedactCredentials(path)
	}
	if len(path) > maxEchoedPath {
		path = path[:maxEchoedPath] + "…"
	}
	return &Error{
		Status:  http.StatusNotFound,
		Type:    TypeInvalidRequest,
		Code:    CodeUnknownURL,
		Message: "Unknown request URL: " + method + " " + path + ".",
	}
}

// MethodNotAllowed answers a known path asked with the wrong method.
func MethodNotAllowed(method, path, allowed string) *Error {
	return &Error{
		Status:  http.StatusMethodNotAllowed,
		Type:    TypeInvalidRequest,
		Code:    CodeMethodNotAllowed,
		Message: "Method " + method + " is not allowed for " + path + "; use " + allowed + ".",
		Allow:   allowed,
	}
}

// TooLarge answers a request body over the configured limit.
func TooLarge(limit int64) *Error {
	return &Error{
		Status:  http.StatusRequestEntityTooLarge,
		Type:    TypeInvalidRequest,
		Code:    CodeRequestTooLarge,
		Message: "The request body is larger than the limit of " + strconv.FormatInt(limit, 10) + " bytes.",
	}
}

// UpstreamExhausted is the 429 of a request while the upstream says the
// server key, or model when not "", is spent for retryAfter seconds more.
func UpstreamExhausted(model string, retryAfter int) *Error {
	what := "this service"
	if model != "" {
		what = "the model " + strconv.Quote(model)
	}
	return &Error{
		Status:     http.StatusTooManyRequests,
		Type:       "requests",
		Code:       "upstream_rate_limited",
		Message:    "The upstream API's rate limit for " + what + " is reached. Please try again in " + strconv.Itoa(retryAfter) + "s.",
		RetryAfter: retryAfter,
	}
}

// RetrySeconds rounds a wait up to whole seconds, at least one, so that
// a caller that waits that long is let through.
func RetrySeconds(d time.Duration) int {
	return max(int((d+time.Second-1)/time.Second), 1)
}

// Clip bounds s, a caller's string that an answer repeats, to n bytes.
func Clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
