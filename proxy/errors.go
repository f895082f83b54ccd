package proxy

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"

	"go.uber.org/zap"
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
	errUpstreamNotAnswer   = &APIError{Status: http.StatusBadGateway, Type: TypeAPI, Code: CodeUpstreamBadAnswer, Message: "The upstream API sent something other than an answer of the API (a redirect, or content of another type). Please try again later."}
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
// is passed on as it came: the caller's request is what it speaks of. Any
// other 4xx, and every 5xx, whose body may be a page naming the
// upstream's internals, is replaced by the proxy's own error: the same
// 4xx status, or for a 5xx its status if the SDKs know it (500, 502,
// 503, 504; they retry those), else 502.
func errorAnswer(res *http.Response, logger *zap.Logger) io.ReadCloser {
	status := res.StatusCode
	var keep *checkedAnswer
	if status < 500 && isJSON(res.Header.Get("Content-Type")) {
		keep = readError(res)
	}
	res.Body.Close()
	if keep != nil {
		res.ContentLength = int64(len(keep.rest))
		res.Header.Set("Content-Length", strconv.Itoa(len(keep.rest)))
		return keep
	}
	e := &APIError{Status: status, Type: TypeInvalidRequest, Code: CodeUpstreamError,
		Message: "The upstream API refused the request with status " + strconv.Itoa(status) + "."}
	if status >= 500 {
		switch status {
		case http.StatusInternalServerError, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		default:
			e.Status = http.StatusBadGateway
		}
		e.Type = TypeAPI
		e.Message = "The upstream API failed with status " + strconv.Itoa(status) + ". Please try again later."
	}
	if ce := logger.Check(zap.InfoLevel, "upstream error answer replaced by the proxy's own"); ce != nil {
		ce.Write(zap.Int("upstream_status", status), zap.String("content_type", res.Header.Get("Content-Type")))
	}
	body := append(e.appendJSON(make([]byte, 0, 128+len(e.Message))), '\n')
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
