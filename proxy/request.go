package proxy

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
)

// bytesPerToken is the rough size of a token in a prompt, for the estimate
// that admission reserves before the upstream says what was used.
const bytesPerToken = 4

// RequestInfo is what the proxy reads from a request body.
type RequestInfo struct {
	Model        string
	Stream       bool
	IncludeUsage bool  // stream_options.include_usage, as the client asked
	MaxTokens    int64 // max_tokens, else max_completion_tokens; 0 when absent
	N            int64 // answers asked, at least 1
	// The body names these fields, even as null: a field is then
	// rewritten, never added twice.
	hasStreamOpt, hasMaxTokens bool
}

// requestFields are the fields the proxy reads; the rest of the body is
// passed on untouched.
type requestFields struct {
	Model               string          `json:"model"`
	Stream              bool            `json:"stream"`
	StreamOptions       json.RawMessage `json:"stream_options"`
	MaxTokens           json.RawMessage `json:"max_tokens"`
	MaxCompletionTokens json.RawMessage `json:"max_completion_tokens"`
	N                   *int64          `json:"n"`
}

// ParseRequest reads the fields the proxy needs from a JSON body, refusing
// a body that is not a JSON object with 400.
func ParseRequest(body []byte) (RequestInfo, *APIError) {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return RequestInfo{}, invalidRequest("The request body must be a JSON object.")
	}
	var f requestFields
	if err := json.Unmarshal(body, &f); err != nil {
		return RequestInfo{}, invalidRequest("We could not parse the JSON body of your request: " + err.Error())
	}
	info := RequestInfo{
		Model: f.Model, Stream: f.Stream, N: 1,
		hasStreamOpt: f.StreamOptions != nil, hasMaxTokens: f.MaxTokens != nil,
	}
	if len(f.StreamOptions) > 0 && string(f.StreamOptions) != "null" {
		var opts struct {
			IncludeUsage bool `json:"include_usage"`
		}
		if err := json.Unmarshal(f.StreamOptions, &opts); err != nil {
			return RequestInfo{}, invalidRequest("stream_options must be an object.")
		}
		info.IncludeUsage = opts.IncludeUsage
	}
	for _, raw := range []json.RawMessage{f.MaxCompletionTokens, f.MaxTokens} {
		if len(raw) > 0 && string(raw) != "null" {
			n, err := strconv.ParseInt(string(raw), 10, 64)
			if err != nil || n < 1 {
				return RequestInfo{}, invalidRequest("max_tokens and max_completion_tokens must be positive integers.")
			}
			info.MaxTokens = n
		}
	}
	if f.N != nil {
		if *f.N < 1 || *f.N > 128 {
			return RequestInfo{}, invalidRequest("n must be between 1 and 128.")
		}
		info.N = *f.N
	}
	return info, nil
}

// Estimate is the tokens to reserve for a request of body's size that may
// answer up to maxTokens per answer: an upper guess that settlement
// corrects with what the upstream reports.
func (info RequestInfo) Estimate(bodyLen int, maxTokens int64) int64 {
	return PromptEstimate(int64(bodyLen)) + maxTokens*info.N
}

// PromptEstimate guesses the prompt tokens of a body of bodyLen bytes.
func PromptEstimate(bodyLen int64) int64 { return bodyLen / bytesPerToken }

// WithStreamUsage returns body asking the upstream for a stream's usage
// (stream_options.include_usage), the one way to learn what a stream used.
// The body is changed only where it must be.
func WithStreamUsage(body []byte, info RequestInfo) ([]byte, error) {
	if info.IncludeUsage {
		return body, nil
	}
	if !info.hasStreamOpt {
		return insertField(body, "stream_options", []byte(`{"include_usage":true}`)), nil
	}
	// stream_options is there without include_usage: rewrite that one field.
	var opts map[string]json.RawMessage
	fields, err := topLevel(body)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(fields["stream_options"], &opts); err != nil || opts == nil {
		opts = make(map[string]json.RawMessage)
	}
	opts["include_usage"] = json.RawMessage("true")
	raw, err := json.Marshal(opts)
	if err != nil {
		return nil, err
	}
	fields["stream_options"] = raw
	return json.Marshal(fields)
}

// SetMaxTokens returns body with max_tokens set to n, for a request that
// did not set it (or set it to null).
func SetMaxTokens(body []byte, info RequestInfo, n int64) ([]byte, error) {
	value := strconv.AppendInt(nil, n, 10)
	if !info.hasMaxTokens {
		return insertField(body, "max_tokens", value), nil
	}
	fields, err := topLevel(body)
	if err != nil {
		return nil, err
	}
	fields["max_tokens"] = value
	return json.Marshal(fields)
}

// insertField adds "key":value as the first field of a JSON object that
// does not have key, leaving every other byte as it was.
func insertField(body []byte, key string, value []byte) []byte {
	i := bytes.IndexByte(body, '{')
	rest := body[i+1:]
	out := make([]byte, 0, len(body)+len(key)+len(value)+4)
	out = append(out, body[:i+1]...)
	out = strconv.AppendQuote(out, key)
	out = append(out, ':')
	out = append(out, value...)
	if len(bytes.TrimLeft(rest, " \t\r\n")) > 0 && bytes.TrimLeft(rest, " \t\r\n")[0] != '}' {
		out = append(out, ',')
	}
	return append(out, rest...)
}

func topLevel(body []byte) (map[string]json.RawMessage, error) {
	var fields map[string]json.RawMessage
	err := json.Unmarshal(body, &fields)
	return fields, err
}

func invalidRequest(msg string) *APIError {
	return &APIError{Status: http.StatusBadRequest, Type: TypeInvalidRequest, Code: "invalid_request", Message: msg}
}
