package proxy

import (
	"net/http"
	"strconv"
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
)

// APIError is an error answered by the proxy itself, written in the
// upstream API's shape: {"error":{"message","type","code"}}.
type APIError struct {
	Status  int
	Type    string
	Code    string
	Message string
	Allow   string // methods for the Allow header of a 405
}

func (e *APIError) Error() string { return e.Message }

// Write sends e as the whole response.
func (e *APIError) Write(w http.ResponseWriter) {
	body := e.appendJSON(make([]byte, 0, 128+len(e.Message)))
	body = append(body, '\n')
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Del("Content-Encoding")
	if e.Allow != "" {
		h.Set("Allow", e.Allow)
	}
	w.WriteHeader(e.Status)
	_, _ = w.Write(body)
}

// appendJSON appends {"error":{…}} to b without reflection.
func (e *APIError) appendJSON(b []byte) []byte {
	b = append(b, `{"error":{"message":`...)
	b = strconv.AppendQuote(b, e.Message)
	b = append(b, `,"type":`...)
	b = strconv.AppendQuote(b, e.Type)
	b = append(b, `,"code":`...)
	b = strconv.AppendQuote(b, e.Code)
	return append(b, "}}"...)
}

// sseEvent frames e as one server-sent event, for streams that already
// started when the failure happened.
func (e *APIError) sseEvent() []byte {
	b := append(make([]byte, 0, 160+len(e.Message)), "data: "...)
	return append(e.appendJSON(b), "\n\n"...)
}

// maxEchoedPath bounds how much of a caller's path an error repeats.
const maxEchoedPath = 200

// NotFound answers a path the proxy does not serve.
func NotFound(method, path string) *APIError {
	if HasCredential(path) {
		path = RedactCredentials(path)
	}
	if len(path) > maxEchoedPath {
		path = path[:maxEchoedPath] + "…"
	}
	return &APIError{
		Status:  http.StatusNotFound,
		Type:    TypeInvalidRequest,
		Code:    CodeUnknownURL,
		Message: "Unknown request URL: " + method + " " + path + ".",
	}
}

// MethodNotAllowed answers a known path asked with the wrong method.
func MethodNotAllowed(method, path, allowed string) *APIError {
	return &APIError{
		Status:  http.StatusMethodNotAllowed,
		Type:    TypeInvalidRequest,
		Code:    CodeMethodNotAllowed,
		Message: "Method " + method + " is not allowed for " + path + "; use " + allowed + ".",
		Allow:   allowed,
	}
}

// TooLarge answers a request body over the configured limit.
func TooLarge(limit int64) *APIError {
	return &APIError{
		Status:  http.StatusRequestEntityTooLarge,
		Type:    TypeInvalidRequest,
		Code:    CodeRequestTooLarge,
		Message: "The request body is larger than the limit of " + strconv.FormatInt(limit, 10) + " bytes.",
	}
}

// Upstream failures. Their messages are fixed on purpose: nothing of the
// upstream's own answer (which may name the server key) reaches the client.
var (
	errUpstreamUnavailable = &APIError{Status: http.StatusBadGateway, Type: TypeAPI, Code: CodeUpstreamUnavailable, Message: "The upstream API could not be reached. Please try again later."}
	errUpstreamTimeout     = &APIError{Status: http.StatusGatewayTimeout, Type: TypeAPI, Code: CodeUpstreamTimeout, Message: "The upstream API did not answer in time. Please try again later."}
	errUpstreamAuth        = &APIError{Status: http.StatusBadGateway, Type: TypeAPI, Code: CodeUpstreamAuth, Message: "The proxy could not authenticate with the upstream API. The operator has been notified."}
	errUpstreamBadAnswer   = &APIError{Status: http.StatusBadGateway, Type: TypeAPI, Code: CodeUpstreamBadAnswer, Message: "The upstream API sent an answer that is not valid JSON. Please try again later."}
	errUpstreamStream      = &APIError{Status: http.StatusBadGateway, Type: TypeAPI, Code: CodeUpstreamStream, Message: "The upstream API failed while streaming the answer. The answer is incomplete."}
)
