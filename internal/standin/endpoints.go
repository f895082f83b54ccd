package standin

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"strconv"
	"time"
	"unicode"
)

// embeddingDims is the length of every embedding vector.
const embeddingDims = 8

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatRequest struct {
	Model               string         `json:"model"`
	Messages            []chatMessage  `json:"messages"`
	MaxTokens           *int           `json:"max_tokens"`
	MaxCompletionTokens *int           `json:"max_completion_tokens"`
	N                   *int           `json:"n"`
	Stream              bool           `json:"stream"`
	StreamOptions       *streamOptions `json:"stream_options"`
}

type chatMessage struct {
	Content words `json:"content"`
}

type completionRequest struct {
	Model         string         `json:"model"`
	Prompt        texts          `json:"prompt"`
	MaxTokens     *int           `json:"max_tokens"`
	N             *int           `json:"n"`
	BestOf        *int           `json:"best_of"`
	Stream        bool           `json:"stream"`
	StreamOptions *streamOptions `json:"stream_options"`
}

type embeddingRequest struct {
	Model          string `json:"model"`
	Input          texts  `json:"input"`
	EncodingFormat string `json:"encoding_format"`
}

func (s *Server) chat(w http.ResponseWriter, r *http.Request, body []byte, b *Behavior, now time.Time) {
	var req chatRequest
	if !decode(w, body, &req) {
		return
	}
	switch {
	case req.Messages == nil:
		writeError(w, http.StatusBadRequest, "invalid_request_error", "missing_required_parameter", "messages", "Missing required parameter: 'messages'.")
		return
	case len(req.Messages) == 0:
		writeError(w, http.StatusBadRequest, "invalid_request_error", "empty_array", "messages", "Invalid 'messages': empty array. Expected an array with minimum length 1.")
		return
	}
	if b.RejectMaxTokens && req.MaxTokens != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "unsupported_parameter", "max_tokens",
			"Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.")
		return
	}
	limit, limitParam := req.MaxTokens, "max_tokens"
	if req.MaxCompletionTokens != nil && !b.IgnoreMaxCompletionTokens {
		limit, limitParam = req.MaxCompletionTokens, "max_completion_tokens"
	}
	a, ok := s.plan(w, asked{model: req.Model, limit: limit, limitParam: limitParam, n: req.N, stream: req.Stream, options: req.StreamOptions})
	if !ok {
		return
	}
	s.capAnswer(&a, limit, limitParam, b)
	for _, m := range req.Messages {
		a.promptTokens += int(m.Content) + 3
	}
	a.chat = true
	s.answer(w, r, &a, b, "chatcmpl-", now)
}

func (s *Server) completions(w http.ResponseWriter, r *http.Request, body []byte, b *Behavior, now time.Time) {
	var req completionRequest
	if !decode(w, body, &req) {
		return
	}
	if len(req.Prompt.items) == 0 {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "missing_required_parameter", "prompt", "Missing required parameter: 'prompt'.")
		return
	}
	a, ok := s.plan(w, asked{model: req.Model, limit: req.MaxTokens, limitParam: "max_tokens", n: req.N, stream: req.Stream, options: req.StreamOptions})
	if !ok {
		return
	}
	s.capAnswer(&a, req.MaxTokens, "max_tokens", b)
	if req.BestOf != nil {
		switch {
		case *req.BestOf < a.choices || *req.BestOf > maxBestOf:
			writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_value", "best_of",
				"Invalid 'best_of': must be at least n and at most "+strconv.Itoa(maxBestOf)+".")
			return
		case a.stream && *req.BestOf > 1:
			writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_value", "best_of",
				"'best_of' cannot be used with 'stream'.")
			return
		}
		a.generated = *req.BestOf
	}
	for _, it := range req.Prompt.items {
		a.promptTokens += it.tokens
	}
	// Like OpenAI, every prompt gets its own n choices, of best_of
	// candidates generated and billed.
	a.generated = max(a.generated, a.choices) * len(req.Prompt.items)
	a.choices *= len(req.Prompt.items)
	s.answer(w, r, &a, b, "cmpl-", now)
}

// asked are the parameters chat and legacy completions share.
type asked struct {
	model      string
	limit      *int   // the cap
	limitParam string // the cap's field
	n          *int
	stream     bool
	options    *streamOptions
}

// plan validates the parameters chat and legacy completions share.
func (s *Server) plan(w http.ResponseWriter, p asked) (answer, bool) {
	modelID, limit, limitParam, n, stream, so := p.model, p.limit, p.limitParam, p.n, p.stream, p.options
	a := answer{choices: 1, tokens: DefaultMaxTokens, finish: "stop"}
	switch {
	case modelID == "":
		writeError(w, http.StatusBadRequest, "invalid_request_error", "missing_required_parameter", "model", "Missing required parameter: 'model'.")
		return a, false
	case limit != nil && (*limit < 1 || *limit > maxTokensLimit):
		writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_value", limitParam,
			"Invalid '"+limitParam+"': must be between 1 and "+strconv.Itoa(maxTokensLimit)+".")
		return a, false
	case n != nil && (*n < 1 || *n > maxChoices):
		writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_value", "n",
			"Invalid 'n': must be between 1 and "+strconv.Itoa(maxChoices)+".")
		return a, false
	case so != nil && !stream:
		writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_value", "stream_options",
			"The 'stream_options' parameter is only allowed when 'stream' is enabled.")
		return a, false
	}
	m, known := s.models[modelID]
	if !known {
		writeModelNotFound(w, modelID)
		return a, false
	}
	a.model = m.quoted
	if limit != nil {
		a.tokens, a.finish = *limit, "length"
	}
	if n != nil {
		a.choices = *n
	}
	a.stream = stream
	a.streamUsage = so != nil && so.IncludeUsage
	return a, true
}

// capAnswer sizes an answer without a cap by b.Uncapped, and notes the
// cap it was given.
func (s *Server) capAnswer(a *answer, limit *int, param string, b *Behavior) {
	if limit == nil {
		if b.Uncapped > 0 {
			a.tokens = b.Uncapped
		}
		s.noteCap(Cap{Tokens: a.tokens})
		return
	}
	s.noteCap(Cap{Field: param, N: *limit, Tokens: a.tokens})
}

// answer sends the planned completion, streamed or whole.
func (s *Server) answer(w http.ResponseWriter, r *http.Request, a *answer, b *Behavior, idPrefix string, now time.Time) {
	id := append(make([]byte, 0, 24), idPrefix...)
	a.id = appendHex(id, s.seq.Add(1))
	a.created = now.Unix()
	if b.PromptTokens > 0 {
		a.promptTokens = b.PromptTokens
	}
	a.cachedTokens, a.usage = min(b.CachedTokens, a.promptTokens), b.Usage
	s.prompt.Add(int64(a.promptTokens))
	s.answered.Add(int64(a.tokens * max(a.choices, a.generated)))
	if a.stream {
		if a.chat {
			a.deltas = b.Deltas
		}
		s.stream(w, r, a, b)
		return
	}
	out := s.getBuf()
	defer s.putBuf(out)
	*out = a.appendWhole(*out)
	if b.Padding > 0 {
		writePadded(w, r, *out, b)
		s.written.Add(int64(a.tokens * a.choices))
		return
	}
	if b.StallMidBody > 0 || b.ResetMidBody > 0 {
		breakWhole(w, r, *out, b)
		return
	}
	writeJSON(w, *out)
	s.written.Add(int64(a.tokens * a.choices))
}

func (s *Server) embeddings(w http.ResponseWriter, body []byte) {
	var req embeddingRequest
	if !decode(w, body, &req) {
		return
	}
	switch {
	case req.Model == "":
		writeError(w, http.StatusBadRequest, "invalid_request_error", "missing_required_parameter", "model", "Missing required parameter: 'model'.")
		return
	case len(req.Input.items) == 0:
		writeError(w, http.StatusBadRequest, "invalid_request_error", "missing_required_parameter", "input", "Missing required parameter: 'input'.")
		return
	case req.EncodingFormat != "" && req.EncodingFormat != "float" && req.EncodingFormat != "base64":
		writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_value", "encoding_format", "Invalid 'encoding_format': expected 'float' or 'base64'.")
		return
	}
	m, known := s.models[req.Model]
	if !known {
		writeModelNotFound(w, req.Model)
		return
	}
	tokens := 0
	for _, it := range req.Input.items {
		if it.tokens == 0 {
			writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_value", "input", "Invalid 'input': inputs must not be empty.")
			return
		}
		tokens += it.tokens
	}
	s.prompt.Add(int64(tokens))

	out := s.getBuf()
	defer s.putBuf(out)
	o := append((*out)[:0], `{"object":"list","data":[`...)
	for i, it := range req.Input.items {
		if i > 0 {
			o = append(o, ',')
		}
		o = append(o, `{"object":"embedding","index":`...)
		o = strconv.AppendInt(o, int64(i), 10)
		o = append(o, `,"embedding":`...)
		o = appendVector(o, embed(it.hash), req.EncodingFormat == "base64")
		o = append(o, '}')
	}
	o = append(o, `],"model":`...)
	o = append(o, m.quoted...)
	o = append(o, `,"usage":{"prompt_tokens":`...)
	o = strconv.AppendInt(o, int64(tokens), 10)
	o = append(o, `,"total_tokens":`...)
	o = strconv.AppendInt(o, int64(tokens), 10)
	*out = append(o, "}}"...)
	writeJSON(w, *out)
}

// usage answers with organisation-wide figures, which a proxy must not show
// to ordinary clients.
func (s *Server) usage(w http.ResponseWriter) {
	prompt, answered := s.prompt.Load(), s.answered.Load()
	o := append(make([]byte, 0, 192), `{"object":"usage","organization":"`+Organization+`","total_requests":`...)
	o = strconv.AppendInt(o, s.count.Load(), 10)
	o = append(o, `,"prompt_tokens":`...)
	o = strconv.AppendInt(o, prompt, 10)
	o = append(o, `,"completion_tokens":`...)
	o = strconv.AppendInt(o, answered, 10)
	o = append(o, `,"total_tokens":`...)
	o = strconv.AppendInt(o, prompt+answered, 10)
	writeJSON(w, append(o, '}'))
}

// decode parses a JSON request body, answering 400 if it cannot.
func decode(w http.ResponseWriter, body []byte, v any) bool {
	if err := json.Unmarshal(body, v); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_json",
			"", "We could not parse the JSON body of your request: "+err.Error())
		return false
	}
	return true
}

// words is message content reduced to its word count. Content is a string,
// an array of parts whose "text" counts, or null.
type words int

func (c *words) UnmarshalJSON(b []byte) error {
	switch b[0] {
	case 'n':
		*c = 0
	case '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*c = words(countWords(s))
	case '[':
		var parts []struct {
			Text string `json:"text"`
		}
		if err := json.Unmarshal(b, &parts); err != nil {
			return err
		}
		*c = 0
		for _, p := range parts {
			*c += words(countWords(p.Text))
		}
	default:
		return errors.New("content must be a string, an array of parts or null")
	}
	return nil
}

// texts is OpenAI's prompt/input union: a string, an array of strings, an
// array of token IDs, or an array of token ID arrays. Null means absent.
type texts struct {
	items []text
}

// text is one input, reduced to its token count and a hash of its content.
type text struct {
	tokens int
	hash   uint64
}

func (t *texts) UnmarshalJSON(b []byte) error {
	switch b[0] {
	case 'n':
		return nil
	case '"':
		it, err := parseText(b)
		t.items = []text{it}
		return err
	case '[':
		var raw []json.RawMessage
		if err := json.Unmarshal(b, &raw); err != nil {
			return err
		}
		if len(raw) > 0 && raw[0][0] != '"' && raw[0][0] != '[' {
			it, err := parseText(b) // a single input given as token IDs
			t.items = []text{it}
			return err
		}
		t.items = make([]text, len(raw))
		for i, r := range raw {
			var err error
			if t.items[i], err = parseText(r); err != nil {
				return err
			}
		}
		return nil
	}
	return errors.New("expected a string or an array")
}

// parseText reads one input: a string or an array of token IDs.
func parseText(b []byte) (text, error) {
	if b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return text{}, err
		}
		return text{tokens: countWords(s), hash: hashBytes(fnvOffset, s)}, nil
	}
	var ids []int64
	if err := json.Unmarshal(b, &ids); err != nil {
		return text{}, err
	}
	h := uint64(fnvOffset)
	var le [8]byte
	for _, id := range ids {
		binary.LittleEndian.PutUint64(le[:], uint64(id))
		h = hashBytes(h, le[:])
	}
	return text{tokens: len(ids), hash: h}, nil
}

// countWords counts whitespace-separated words, as strings.Fields would,
// without allocating them.
func countWords(s string) int {
	n, inWord := 0, false
	for _, r := range s {
		space := unicode.IsSpace(r)
		if !space && !inWord {
			n++
		}
		inWord = !space
	}
	return n
}

const fnvOffset = 14695981039346656037

// hashBytes continues an FNV-1a hash over p.
func hashBytes[T string | []byte](h uint64, p T) uint64 {
	for i := 0; i < len(p); i++ {
		h ^= uint64(p[i])
		h *= 1099511628211
	}
	return h
}

// embed derives a deterministic unit vector from a hash, using splitmix64 to
// spread the bits.
func embed(h uint64) [embeddingDims]float32 {
	var raw [embeddingDims]float64
	var norm float64
	for i := range raw {
		h += 0x9e3779b97f4a7c15
		z := (h ^ h>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		z ^= z >> 31
		raw[i] = float64(z>>11)/(1<<52) - 1 // uniform in [-1, 1)
		norm += raw[i] * raw[i]
	}
	norm = math.Sqrt(norm)
	var v [embeddingDims]float32
	for i := range v {
		v[i] = float32(raw[i] / norm)
	}
	return v
}

// appendVector appends v as a JSON array of numbers or, like OpenAI's
// encoding_format "base64", as a base64 string of little-endian float32s.
func appendVector(b []byte, v [embeddingDims]float32, asBase64 bool) []byte {
	if asBase64 {
		var raw [embeddingDims * 4]byte
		for i, f := range v {
			binary.LittleEndian.PutUint32(raw[i*4:], math.Float32bits(f))
		}
		b = append(b, '"')
		b = base64.StdEncoding.AppendEncode(b, raw[:])
		return append(b, '"')
	}
	b = append(b, '[')
	for i, f := range v {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendFloat(b, float64(f), 'g', -1, 32)
	}
	return append(b, ']')
}
