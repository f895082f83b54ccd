package proxy

import (
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"unicode/utf8"
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

// ParseRequest reads the fields the proxy needs from a JSON body, refusing
// with 400 a body that is not a JSON object, or whose fields the proxy
// polices are of the wrong type or given twice.
//
// Keys match exactly, as the upstream matches them: encoding/json would
// also take "Model" or "MAX_TOKENS" for the fields, letting a caller show
// the policy one model and the upstream another. Keys are compared
// unescaped ("mod\u0065l" is "model"), as every JSON parser reads them.
func ParseRequest(body []byte) (RequestInfo, *APIError) {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return RequestInfo{}, invalidRequest("The request body must be a JSON object.")
	}
	if !validJSON(body) {
		// Only to say where: the error path may be slow.
		err := json.Unmarshal(body, new(struct{}))
		return RequestInfo{}, invalidRequest("We could not parse the JSON body of your request: " + errText(err))
	}
	info := RequestInfo{N: 1}
	var seen uint8
	var maxTokens, maxCompletion int64
	apiErr := eachField(trimmed, func(key, value []byte) *APIError {
		field := policedField(key)
		if field == 0 {
			return nil
		}
		if seen&field != 0 {
			return invalidRequest("The field " + fieldNames[field] + " appears more than once.")
		}
		seen |= field
		null := string(value) == "null"
		switch field {
		case fieldModel:
			if null {
				return nil
			}
			m, ok := jsonString(value)
			if !ok {
				return invalidRequest("model must be a string.")
			}
			info.Model = m
		case fieldStream:
			if !null && string(value) != "true" && string(value) != "false" {
				return invalidRequest("stream must be a boolean.")
			}
			info.Stream = string(value) == "true"
		case fieldStreamOptions:
			info.hasStreamOpt = true
			if null {
				return nil
			}
			if value[0] != '{' {
				return invalidRequest("stream_options must be an object.")
			}
			return eachField(value, func(key, v []byte) *APIError {
				if string(keyName(key)) == "include_usage" {
					info.IncludeUsage = string(v) == "true"
				}
				return nil
			})
		case fieldMaxTokens, fieldMaxCompletionTokens:
			if field == fieldMaxTokens {
				info.hasMaxTokens = true
			}
			if null {
				return nil
			}
			n, err := strconv.ParseInt(string(value), 10, 64)
			if err != nil || n < 1 {
				return invalidRequest("max_tokens and max_completion_tokens must be positive integers.")
			}
			if field == fieldMaxTokens {
				maxTokens = n
			} else {
				maxCompletion = n
			}
		case fieldN:
			if null {
				return nil
			}
			n, err := strconv.ParseInt(string(value), 10, 64)
			if err != nil || n < 1 || n > 128 {
				return invalidRequest("n must be between 1 and 128.")
			}
			info.N = n
		}
		return nil
	})
	if apiErr != nil {
		return RequestInfo{}, apiErr
	}
	// Whichever of the two the upstream honours, the larger is policed.
	info.MaxTokens = max(maxTokens, maxCompletion)
	return info, nil
}

// The fields ParseRequest polices, as bits of a set.
const (
	fieldModel uint8 = 1 << iota
	fieldStream
	fieldStreamOptions
	fieldMaxTokens
	fieldMaxCompletionTokens
	fieldN
)

var fieldNames = map[uint8]string{
	fieldModel: "model", fieldStream: "stream", fieldStreamOptions: "stream_options",
	fieldMaxTokens: "max_tokens", fieldMaxCompletionTokens: "max_completion_tokens", fieldN: "n",
}

// policedField names the field of a raw JSON key, 0 for one the proxy
// passes on without looking.
func policedField(rawKey []byte) uint8 {
	switch string(keyName(rawKey)) {
	case "model":
		return fieldModel
	case "stream":
		return fieldStream
	case "stream_options":
		return fieldStreamOptions
	case "max_tokens":
		return fieldMaxTokens
	case "max_completion_tokens":
		return fieldMaxCompletionTokens
	case "n":
		return fieldN
	}
	return 0
}

// keyName returns a raw JSON key (quotes included) as a decoder reads it;
// nil for a key that does not decode.
func keyName(raw []byte) []byte {
	name, _ := jsonText(raw)
	return name
}

// jsonString returns the raw JSON value as a string, if it is one.
func jsonString(raw []byte) (string, bool) {
	if raw[0] != '"' {
		return "", false
	}
	text, ok := jsonText(raw)
	return string(text), ok
}

// jsonText returns a raw JSON string (quotes included) as a decoder reads
// it. Plain strings, nearly all, are returned without a copy.
func jsonText(raw []byte) ([]byte, bool) {
	inner := raw[1 : len(raw)-1]
	if verbatim(inner) {
		return inner, true
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, false
	}
	return []byte(s), true
}

// verbatim reports whether the inside of a JSON string reads as it is
// written: no escapes, and ASCII only, since a decoder replaces invalid
// UTF-8 with U+FFFD and the policy must see what the upstream sees.
func verbatim(inner []byte) bool {
	for _, c := range inner {
		if c == '\\' || c >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// eachField calls f with the raw key (quotes included) and value of each
// field of obj, a JSON object known to be valid, in order, until f returns
// an error.
func eachField(obj []byte, f func(key, value []byte) *APIError) *APIError {
	i := skipSpace(obj, 1) // past '{'
	for i < len(obj) && obj[i] != '}' {
		keyStart := i
		keyEnd := skipString(obj, i)
		i = skipSpace(obj, skipSpace(obj, keyEnd)+1) // past ':'
		valueEnd := skipValue(obj, i)
		if err := f(obj[keyStart:keyEnd], obj[i:valueEnd]); err != nil {
			return err
		}
		i = skipSpace(obj, valueEnd)
		if i < len(obj) && obj[i] == ',' {
			i = skipSpace(obj, i+1)
		}
	}
	return nil
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\r' || b[i] == '\n') {
		i++
	}
	return i
}

// skipString returns the end of the JSON string starting at b[i] == '"'.
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(b)
}

// skipValue returns the end of the valid JSON value starting at b[i].
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				i = skipString(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return len(b)
	}
	for ; i < len(b); i++ {
		switch b[i] {
		case ',', '}', ']', ' ', '\t', '\r', '\n':
			return i
		}
	}
	return len(b)
}

func errText(err error) string {
	if err == nil {
		return "invalid JSON"
	}
	return err.Error()
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
