package wire

import (
	"bytes"
	"encoding/json"
	"strconv"
	"unicode/utf8"
)

// bytesPerToken is the rough size of a token in a prompt, for the estimate
// that admission reserves before the upstream says what was used.
const bytesPerToken = 4

// Bounds on what one request may ask. They are far above what any real
// use needs and keep every product of them well inside an int64.
const (
	maxN        = 128     // n and best_of
	maxPrompts  = 2048    // prompts of a completion, inputs of an embedding
	maxChoices  = 2048    // prompts × max(n, best_of)
	maxTokenCap = 1 << 31 // max_tokens, max_completion_tokens: an int32, as the API reads them
	maxTokenID  = 1 << 32 // a token ID in a prompt or input given as token arrays
)

// MaxTokenCap is the largest max_tokens a request may ask, and so the
// largest cap a tier or a key may set.
const MaxTokenCap = maxTokenCap

// maxExplainedBody is the largest invalid body whose error says where it
// is invalid: saying where takes a second, slower parse, which a caller
// must not be able to make the proxy repeat over megabytes.
const maxExplainedBody = 64 << 10

// RequestInfo is what the proxy reads from a request body.
type RequestInfo struct {
	Model        string
	Stream       bool
	IncludeUsage bool  // stream_options.include_usage, as the client asked
	MaxTokens    int64 // max_tokens, else max_completion_tokens; 0 when absent
	N            int64 // answers asked per prompt, at least 1
	BestOf       int64 // best_of (completions): candidates generated per prompt; 0 when absent
	// Prompts is how many prompts ("prompt", completions) or inputs
	// ("input", embeddings) the body gives, each answered on its own; 0
	// when it gives none.
	Prompts int64
	// Choices is the answers the upstream generates, each up to MaxTokens:
	// n, or best_of when larger (the upstream generates, and bills, every
	// candidate and returns the best n), for each prompt.
	Choices int64
	// PromptTokens estimates the prompt: token IDs given as arrays are
	// counted exactly, the rest of the body at bytesPerToken.
	PromptTokens int64
	// The body names these fields, even as null: a field is then
	// rewritten, never added twice.
	hasStreamOpt, hasMaxTokens, hasMaxCompletion bool
	// The caps of max_tokens and max_completion_tokens; 0 when absent or
	// null.
	maxTokens, maxCompletion int64
}

// Fields of an output cap: /v1/completions reads max_tokens; chat reads
// either, and OpenAI's reasoning models only max_completion_tokens.
const (
	MaxTokensField           = "max_tokens"
	MaxCompletionTokensField = "max_completion_tokens"
)

// CapField names the field that holds the request's cap (MaxTokens, the
// larger of the two); "" when it sets none.
func (info *RequestInfo) CapField() string {
	switch {
	case info.maxCompletion > info.maxTokens:
		return MaxCompletionTokensField
	case info.maxTokens > 0:
		return MaxTokensField
	}
	return ""
}

// NamedCapField names a cap field the body names, even as null:
// max_tokens first; "" when it names neither.
func (info *RequestInfo) NamedCapField() string {
	switch {
	case info.hasMaxTokens:
		return MaxTokensField
	case info.hasMaxCompletion:
		return MaxCompletionTokensField
	}
	return ""
}

// SetsMaxTokens reports whether max_tokens holds a cap, not only
// max_completion_tokens.
func (info *RequestInfo) SetsMaxTokens() bool { return info.maxTokens > 0 }

// ParseRequest reads the fields the proxy needs from a JSON body, refusing
// with 400 a body that is not a JSON object, or whose fields the proxy
// polices are of the wrong type, out of bounds, given twice, or spelled
// another way.
//
// Keys are compared unescaped ("mod\u0065l" is "model"), as every JSON
// parser reads them. A key that is not byte-equal to a policed field but
// folds to one ("Model", "MAX_TOKENS", "max_tokenſ" with U+017F) is
// refused: encoding/json and other case-insensitive parsers read it as the
// field, exact parsers as another, and the proxy cannot know which kind the
// upstream is. The same holds inside stream_options.
func ParseRequest(body []byte) (RequestInfo, error) {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return RequestInfo{}, invalidRequest("The request body must be a JSON object.")
	}
	if !ValidJSON(body) {
		if len(body) > maxExplainedBody {
			return RequestInfo{}, invalidRequest("We could not parse the JSON body of your request: it is not valid JSON.")
		}
		// Only to say where: the error path is slow.
		err := json.Unmarshal(body, new(struct{}))
		return RequestInfo{}, invalidRequest("We could not parse the JSON body of your request: " + errText(err))
	}
	info := RequestInfo{N: 1}
	var seen uint16
	var promptN, inputN prompts
	apiErr := eachField(trimmed, func(key, value []byte) error {
		field, apiErr := policedField(key, topFields)
		if field == 0 {
			return apiErr
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
			var seenOpt uint16
			return eachField(value, func(key, v []byte) error {
				field, apiErr := policedField(key, optionFields)
				if field == 0 {
					return apiErr
				}
				if seenOpt&field != 0 {
					return invalidRequest("The field stream_options.include_usage appears more than once.")
				}
				seenOpt |= field
				if string(v) != "null" && string(v) != "true" && string(v) != "false" {
					return invalidRequest("stream_options.include_usage must be a boolean.")
				}
				info.IncludeUsage = string(v) == "true"
				return nil
			})
		case fieldMaxTokens, fieldMaxCompletionTokens:
			if field == fieldMaxTokens {
				info.hasMaxTokens = true
			} else {
				info.hasMaxCompletion = true
			}
			if null {
				return nil
			}
			n, ok := count(value, 1, maxTokenCap)
			if !ok {
				return invalidRequest("max_tokens and max_completion_tokens must be positive integers, at most " + strconv.Itoa(maxTokenCap) + ".")
			}
			if field == fieldMaxTokens {
				info.maxTokens = n
			} else {
				info.maxCompletion = n
			}
		case fieldN, fieldBestOf:
			if null {
				return nil
			}
			n, ok := count(value, 1, maxN)
			if !ok {
				return invalidRequest(fieldNames[field] + " must be an integer between 1 and " + strconv.Itoa(maxN) + ".")
			}
			if field == fieldN {
				info.N = n
			} else {
				info.BestOf = n
			}
		case fieldPrompt, fieldInput:
			p := &promptN
			if field == fieldInput {
				p = &inputN
			}
			if !null && !p.read(value) {
				return invalidRequest(fieldNames[field] + " must be a string, an array of strings, an array of token IDs or an array of token ID arrays, of at most " + strconv.Itoa(maxPrompts) + " items.")
			}
		}
		return nil
	})
	if apiErr != nil {
		return RequestInfo{}, apiErr
	}
	if info.BestOf != 0 && info.BestOf < info.N {
		return RequestInfo{}, invalidRequest("best_of must be at least n.")
	}
	// Whichever of the two the upstream honours, the larger is policed.
	info.MaxTokens = max(info.maxTokens, info.maxCompletion)
	// A body may name both prompt and input; the upstream reads one, the
	// reservation counts the larger.
	info.Prompts = max(promptN.items, inputN.items)
	info.Choices = max(info.Prompts, 1) * max(info.N, info.BestOf)
	if info.Choices > maxChoices {
		return RequestInfo{}, invalidRequest("This request asks for " + strconv.FormatInt(info.Choices, 10) +
			" answers (prompts × max(n, best_of)); at most " + strconv.Itoa(maxChoices) + " are allowed.")
	}
	ids := promptN.tokens + inputN.tokens
	info.PromptTokens = PromptEstimate(int64(len(body))-promptN.tokenBytes-inputN.tokenBytes) + ids
	return info, nil
}

// count reads a JSON integer in [lo, hi], lo >= 0. It runs for every
// token ID of a prompt, so it reads digits by hand: strconv would need a
// string, allocated since its error keeps it.
func count(value []byte, lo, hi int64) (int64, bool) {
	n, end, ok := leadingDigits(value, hi)
	return n, ok && end == len(value) && n >= lo
}

// leadingDigits reads the decimal digits at the start of v: their value,
// how many bytes they take, and whether there is at least one and the
// value stays within hi (at most (MaxInt64-9)/10, so nothing overflows).
func leadingDigits(v []byte, hi int64) (n int64, end int, ok bool) {
	for ; end < len(v) && '0' <= v[end] && v[end] <= '9'; end++ {
		if n = n*10 + int64(v[end]-'0'); n > hi {
			return 0, end, false
		}
	}
	return n, end, end > 0
}

// prompts counts the items of a prompt or input: a string, an array of
// strings, an array of token IDs (one item) or an array of token ID
// arrays.
type prompts struct {
	items      int64
	tokens     int64 // token IDs, counted exactly
	tokenBytes int64 // the bytes of the token ID arrays, left out of the byte estimate
}

// read counts value into p, reporting whether it is one of the forms.
func (p *prompts) read(value []byte) bool {
	switch value[0] {
	case '"':
		p.items = 1
		return true
	case '[':
	default:
		return false
	}
	var kind byte // of the array's elements: '"', '[' or '0' for numbers
	ok := eachItem(value, func(item []byte) bool {
		k := item[0]
		if k == '-' || (k >= '0' && k <= '9') {
			k = '0'
		}
		if kind == 0 {
			kind = k
		}
		if k != kind {
			return false
		}
		switch k {
		case '"':
			p.items++
		case '0':
			if _, ok := count(item, 0, maxTokenID); !ok {
				return false
			}
			p.tokens++
		case '[':
			p.items++
			p.tokenBytes += int64(len(item))
			return eachItem(item, func(id []byte) bool {
				if _, ok := count(id, 0, maxTokenID); !ok {
					return false
				}
				p.tokens++
				return true
			})
		default:
			return false
		}
		return p.items <= maxPrompts
	})
	if kind == '0' { // a single prompt given as token IDs
		p.items = 1
		p.tokenBytes = int64(len(value))
	}
	return ok
}

// eachItem calls f with each element of arr, a valid JSON array, until f
// returns false; it reports whether none did.
func eachItem(arr []byte, f func(item []byte) bool) bool {
	i := skipSpace(arr, 1) // past '['
	for i < len(arr) && arr[i] != ']' {
		end := skipValue(arr, i)
		if !f(arr[i:end]) {
			return false
		}
		i = skipSpace(arr, end)
		if i < len(arr) && arr[i] == ',' {
			i = skipSpace(arr, i+1)
		}
	}
	return true
}

// The fields ParseRequest polices, as bits of a set.
const (
	fieldModel uint16 = 1 << iota
	fieldStream
	fieldStreamOptions
	fieldMaxTokens
	fieldMaxCompletionTokens
	fieldN
	fieldBestOf
	fieldPrompt
	fieldInput
	fieldIncludeUsage // in stream_options
)

var fieldNames = map[uint16]string{
	fieldModel: "model", fieldStream: "stream", fieldStreamOptions: "stream_options",
	fieldMaxTokens: "max_tokens", fieldMaxCompletionTokens: "max_completion_tokens", fieldN: "n",
	fieldBestOf: "best_of", fieldPrompt: "prompt", fieldInput: "input", fieldIncludeUsage: "include_usage",
}

// policedNames are the policed fields of one object, by the length of
// their names.
type policedNames [22][]policedName

type policedName struct {
	field uint16
	name  []byte
}

var (
	topFields    = namesByLength(fieldModel, fieldStream, fieldStreamOptions, fieldMaxTokens, fieldMaxCompletionTokens, fieldN, fieldBestOf, fieldPrompt, fieldInput)
	optionFields = namesByLength(fieldIncludeUsage)
)

func namesByLength(fields ...uint16) *policedNames {
	var p policedNames
	for _, f := range fields {
		name := fieldNames[f]
		p[len(name)] = append(p[len(name)], policedName{f, []byte(name)})
	}
	return &p
}

// policedField names the policed field of a raw JSON key among names, 0
// for a key the proxy passes on without looking. A key that only folds to
// a policed name is refused.
//
// Keys fold as strings.EqualFold and encoding/json fold them, Unicode
// simple folding: "ſ" (U+017F) folds to "s" and "K" (U+212A) to "k", so a
// key of another length may fold to a name. Nearly every key is plain
// ASCII: it is compared without a copy, and only with the names of its
// own length.
func policedField(rawKey []byte, names *policedNames) (uint16, error) {
	key := rawKey[1 : len(rawKey)-1]
	candidates := names[:]
	if verbatim(key) {
		if len(key) >= len(names) {
			return 0, nil
		}
		candidates = names[len(key) : len(key)+1]
	} else {
		key = keyName(rawKey) // escapes or non-ASCII, rare
	}
	for _, byLength := range candidates {
		for _, p := range byLength {
			if bytes.Equal(key, p.name) {
				return p.field, nil
			}
			if bytes.EqualFold(key, p.name) {
				return 0, foldedKey(string(key), string(p.name))
			}
		}
	}
	return 0, nil
}

func foldedKey(key, name string) error {
	if len(key) > 100 {
		key = key[:100] + "…"
	}
	return invalidRequest("The field " + strconv.Quote(key) + " is another spelling of " + name +
		": some JSON parsers read it as " + name + ", others not. Spell it " + strconv.Quote(name) + ".")
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
func eachField(obj []byte, f func(key, value []byte) error) error {
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

// Estimate is the tokens to reserve for a request that may answer up to
// maxTokens per answer (choice): the prompt and every choice at its
// longest, an upper guess that settlement corrects with what the upstream
// reports. Embeddings generate nothing: their maxTokens is 0.
func (info RequestInfo) Estimate(maxTokens int64) int64 {
	return info.PromptTokens + max(info.Choices, 1)*min(maxTokens, maxTokenCap)
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

// SetCap returns body with field (MaxTokensField or
// MaxCompletionTokensField) set to n, for a request that did not set it
// (or set it to null). The body is changed only where it must be.
func SetCap(body []byte, info RequestInfo, field string, n int64) ([]byte, error) {
	named := info.hasMaxTokens
	if field == MaxCompletionTokensField {
		named = info.hasMaxCompletion
	}
	if !named {
		var digits [20]byte // the usual case allocates only the new body
		return insertField(body, field, strconv.AppendInt(digits[:0], n, 10)), nil
	}
	fields, err := topLevel(body)
	if err != nil {
		return nil, err
	}
	fields[field] = strconv.AppendInt(nil, n, 10)
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

// InvalidRequest is the error of a body the proxy refuses; its text is
// for the caller.
type InvalidRequest string

func (e InvalidRequest) Error() string { return string(e) }

func invalidRequest(msg string) error { return InvalidRequest(msg) }
