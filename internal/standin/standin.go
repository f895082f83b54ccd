// Package standin is an in-process stand-in for the Vigthoria API, an
// OpenAI-compatible LLM service. It speaks the OpenAI wire format closely
// enough for the official openai-go client, answers deterministically, and can
// be told to misbehave (latency, errors, stalls, broken streams, garbage) so
// the proxy can be tested and benchmarked against it.
//
// Answers are made of a fixed sentence, one word per token (see [Answer]).
// Without a token limit a completion is [DefaultMaxTokens] tokens long (or
// Behavior.Uncapped, the model's own limit) and finishes with "stop"; with
// max_tokens (or max_completion_tokens) it fills the limit exactly and
// finishes with "length". [Server.Caps] tells which cap each completion
// was given. Prompt tokens are the number
// of whitespace-separated words in the input, plus 3 per chat message.
package standin

import (
	"bytes"
	"cmp"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/pause"
)

const (
	// RateLimit is the default value of the X-RateLimit-Limit header: the
	// requests allowed per minute. It is advertised only, never enforced.
	RateLimit = 10000
	// Organization names the organisation in the /usage answer, so tests
	// can recognise those figures if a proxy leaks them.
	Organization = "org-standin"
	// DefaultMaxTokens is the answer length when a request sets no limit.
	DefaultMaxTokens = 16

	maxBodyBytes   = 16 << 20
	maxTokensLimit = 16384
	maxChoices     = 128
	maxBestOf      = 20
)

// Kinds of output a streamed chat delta carries, for Behavior.Deltas.
const (
	ContentDeltas   = ""                  // "content", as a plain answer
	ToolCallDeltas  = "tool_calls"        // a function call, its arguments a token a chunk
	ReasoningDeltas = "reasoning_content" // reasoning, as DeepSeek-style APIs stream it, then no content
)

// Options configure a Server. The zero value is usable except for APIKey.
type Options struct {
	// APIKey is the bearer key the server accepts; requests without
	// "Authorization: Bearer <APIKey>" get 401. Required.
	APIKey string
	// BasePath is the path prefix of the API, "/v1" when empty.
	BasePath string
	// Models are the model IDs served, by default
	// vigthoria-fast-1, vigthoria-pro-1 and vigthoria-embed-1.
	Models []string
	// Unlisted are model IDs served besides Models but left out of the
	// GET /models list, as a preview model or an alias may be.
	Unlisted []string
	// NoRecord disables storing Request values, for benchmarks.
	// Count still counts.
	NoRecord bool
	// RateLimit is the requests a minute the rate-limit headers advertise,
	// RateLimit when zero. Load tests set one they never reach: a proxy
	// rightly stops calling an upstream whose budget is spent.
	RateLimit int64
	// Accounts are more bearer keys the server accepts besides APIKey,
	// each an account of its own whose GET /models lists the model IDs
	// given (its private fine-tunes, say), as the real API answers per
	// key. Completions accept the models of Models and of every account.
	Accounts map[string][]string
	// Enforce are limits the server enforces with 429s (enforce.go).
	Enforce Enforce
	// CountKeys counts the requests of each bearer key, for KeyCount.
	CountKeys bool
}

// Behavior switches how the server misbehaves. The failure modes are checked
// in this order: StallHeaders, Latency, authentication, FailStatus, Garbage.
// Each request uses the Behavior in force when it arrived.
type Behavior struct {
	// Latency is waited before anything is written; the wait ends early,
	// without an answer, when the request's context ends.
	Latency time.Duration
	// ChunkDelay is waited between server-sent events of a stream.
	ChunkDelay time.Duration
	// Think is waited once in a stream, after its first event (a chat's
	// role) and before its output, as a reasoning model is silent while
	// it reasons; the wait ends early, without more, when the request's
	// context ends.
	Think time.Duration
	// FailStatus, if nonzero, is a 4xx or 5xx status answered in the error
	// shape. A 429 carries Retry-After and X-RateLimit-Remaining: 0; a 503
	// carries Retry-After.
	FailStatus int
	// FailCount is how many requests get FailStatus before the server is
	// healthy again; zero or less means every request fails.
	FailCount int
	// RetryAfter is the Retry-After value, in seconds, of a 429 or 503.
	RetryAfter int
	// FailRequestOnly makes a FailStatus 429 speak of the request alone,
	// as OpenAI's "Request too large … on tokens per min" does: its
	// X-RateLimit-Remaining is the real count, not 0.
	FailRequestOnly bool
	// AccountHeaders makes every answer carry the headers the real API
	// adds about its account and edge: OpenAI-Organization (Organization),
	// OpenAI-Project, OpenAI-Processing-Ms, OpenAI-Version and a
	// Set-Cookie.
	AccountHeaders bool
	// Informational, if a 1xx status, is sent before anything else: 101
	// switches protocols (the connection is then held, silent, until the
	// client closes it); any other is an interim answer, with a Set-Cookie,
	// before the usual one.
	Informational int
	// FailMidStream, if positive, aborts a stream's connection right after
	// this many content chunks were sent. Shorter streams are not affected.
	FailMidStream int
	// StallMidBody, if positive, stops an answer midway and holds the
	// connection open, silent, until the client leaves: a stream after
	// this many content chunks, a whole answer after half its body.
	StallMidBody int
	// ResetMidBody, if positive, resets the TCP connection midway: a
	// stream after this many content chunks, a whole answer after half
	// its body.
	ResetMidBody int
	// StallHeaders makes the server never answer: it holds the request
	// until its context ends.
	StallHeaders bool
	// Garbage makes the server answer 200 with a body that is not JSON,
	// though labelled application/json.
	Garbage bool
	// Deltas is the kind of output a streamed chat answer carries:
	// ContentDeltas (the default), ToolCallDeltas or ReasoningDeltas.
	// Reasoning deltas are counted as reasoning_tokens in its usage.
	Deltas string
	// CachedTokens is how many of a chat prompt's tokens its usage
	// reports as read from the prompt cache (cached_tokens, at most the
	// prompt's), as an API with prompt caching does for a prefix it saw
	// lately.
	CachedTokens int
	// Usage, if set, is the usage object of every completion answer
	// instead of its own, verbatim: an upstream whose accounting is off.
	Usage string
	// Uncapped, if positive, is how many tokens each answer of a request
	// without a cap (max_tokens, max_completion_tokens) writes instead of
	// DefaultMaxTokens: the model's own output limit, which a real model
	// may write up to when it is given none.
	Uncapped int
	// RejectMaxTokens refuses a chat request that sets max_tokens with
	// 400 unsupported_parameter, as OpenAI's reasoning models (o1, o3,
	// gpt-5) do: they take max_completion_tokens only.
	RejectMaxTokens bool
	// IgnoreMaxCompletionTokens makes a chat request's max_completion_tokens
	// no cap at all, as some OpenAI-compatible servers (Ollama,
	// llama-cpp-python) read it: they honour max_tokens only.
	IgnoreMaxCompletionTokens bool
	// Headers are set on every answer, over the server's own: rate-limit
	// headers of any form, such as an exhausted
	// x-ratelimit-remaining-tokens with its x-ratelimit-reset-tokens.
	Headers http.Header
	// FailBody, if set, is the body of a FailStatus answer instead of the
	// built-in error, verbatim: e.g. an insufficient_quota error.
	FailBody string
	// ForModel and ForKey, if set, confine this Behavior to the requests
	// whose body names that model and that carry that bearer key; every
	// other request is answered as by the zero Behavior, and leaves
	// FailCount alone.
	ForModel, ForKey string
	// PromptTokens, if positive, is the prompt count of every completion
	// answer instead of its words, as an API counts images, files or
	// dense scripts: far above what the request's bytes suggest.
	PromptTokens int

	// What follows makes answers that are not the API's, as a broken or
	// hostile upstream (or a proxy, captive portal or CDN in front of it)
	// sends them.

	// ContentType, if set, is the Content-Type of every answer instead
	// of its own, whatever its status: a 200 as text/html, say.
	ContentType string
	// Redirect, if set, answers every request with 302 Found to it.
	Redirect string
	// LineEnd, if set, ends every line of a stream's events instead of
	// "\n": "\r" or "\r\n", as the SSE format allows.
	LineEnd string
	// LongEvent, if positive, pads a stream's first content delta to
	// about this many bytes; LongEventOpen then never sends that event's
	// blank line, and holds the connection, silent, until the client
	// leaves. The padding is written from one buffer shared by every
	// answer, so that many such answers cost the server nothing.
	LongEvent     int
	LongEventOpen bool
	// Padding, if positive, adds a field "padding" of this many bytes to
	// a whole completion answer, before its choices; with StallMidBody
	// the answer stops right after it. Written from the shared buffer.
	Padding int
}

// Cap is the output cap a completion request was given, as the server
// honoured it.
type Cap struct {
	Field  string // "max_tokens" or "max_completion_tokens"; "" when none was honoured
	N      int    // the cap; 0 when none
	Tokens int    // what each answer wrote
}

// Request is a request as the server received it.
type Request struct {
	Method   string
	Host     string // the Host header, which net/http keeps out of Header
	Path     string
	RawQuery string
	Header   http.Header
	Body     []byte
	At       time.Time
}

// Server is the stand-in API. It is an http.Handler, safe for concurrent use.
type Server struct {
	auth     []byte // the Authorization value to accept, "Bearer <key>"
	base     string
	models   map[string]model
	list     []byte            // the /models answer
	accounts map[string][]byte // the /models answer of each other key
	noRecord bool
	limit    int64    // requests a minute, advertised
	limitHdr []string // limit, formatted for X-RateLimit-Limit

	behavior  atomic.Pointer[behaviorState]
	seq       atomic.Uint64 // numbers request and completion IDs; never reset
	count     atomic.Int64
	active    atomic.Int64 // requests being answered now
	maxActive atomic.Int64 // the most active at once (MaxActive)
	enforce   *enforcer    // nil: no limits of its own
	prompt    atomic.Int64 // prompt tokens served, for /usage
	answered  atomic.Int64 // completion tokens served, for /usage
	written   atomic.Int64 // completion tokens written out to clients

	windowMinute atomic.Int64 // the minute X-RateLimit-Remaining counts in
	windowUsed   atomic.Int64

	mu   sync.Mutex
	reqs []Request
	caps []Cap

	bufs sync.Pool // *[]byte for request and response bodies

	keys keyBook // keys revoked at run time, requests by key (keys.go)
}

// behaviorState pairs a Behavior with its own failure budget, so swapping the
// Behavior also swaps the budget atomically.
type behaviorState struct {
	b         Behavior
	failsLeft atomic.Int64
}

// defaultBehavior answers the requests a confined Behavior leaves out.
var defaultBehavior = &behaviorState{}

// applies reports whether b is for the request: always, unless ForModel
// or ForKey confine it to others.
func (b *Behavior) applies(r *http.Request, body []byte) bool {
	if b.ForKey != "" && r.Header.Get("Authorization") != "Bearer "+b.ForKey {
		return false
	}
	if b.ForModel != "" {
		var req struct {
			Model string `json:"model"`
		}
		if json.Unmarshal(body, &req) != nil || req.Model != b.ForModel {
			return false
		}
	}
	return true
}

// fail reports whether this request is one that gets FailStatus.
func (st *behaviorState) fail() bool {
	return st.b.FailStatus != 0 && (st.b.FailCount <= 0 || st.failsLeft.Add(-1) >= 0)
}

type model struct {
	quoted []byte // the ID as a JSON string
	object []byte // the model object of /models/{id}
}

// modelsCreated is the creation time reported for every model.
const modelsCreated = 1735689600 // 2025-01-01T00:00:00Z

// New returns a Server configured by opts. It panics if opts.APIKey is empty.
func New(opts Options) *Server {
	if opts.APIKey == "" {
		panic("standin: Options.APIKey is required")
	}
	base := opts.BasePath
	if base == "" {
		base = "/v1"
	}
	ids := opts.Models
	if len(ids) == 0 {
		ids = []string{"vigthoria-fast-1", "vigthoria-pro-1", "vigthoria-embed-1"}
	}
	s := &Server{
		auth:     []byte("Bearer " + opts.APIKey),
		base:     strings.TrimSuffix("/"+strings.TrimLeft(base, "/"), "/"),
		models:   make(map[string]model, len(ids)),
		noRecord: opts.NoRecord,
		limit:    cmp.Or(opts.RateLimit, RateLimit),
		enforce:  newEnforcer(opts.Enforce),
		keys:     keyBook{counting: opts.CountKeys},
	}
	s.limitHdr = []string{strconv.FormatInt(s.limit, 10)}
	s.list = s.modelList(ids)
	for key, ids := range opts.Accounts {
		if s.accounts == nil {
			s.accounts = make(map[string][]byte, len(opts.Accounts))
		}
		s.accounts[key] = s.modelList(ids)
	}
	for _, id := range opts.Unlisted {
		quoted, _ := json.Marshal(id)
		obj := append(append([]byte(`{"id":`), quoted...), `,"object":"model","created":`+strconv.Itoa(modelsCreated)+`,"owned_by":"vigthoria"}`...)
		s.models[id] = model{quoted: quoted, object: obj}
	}
	s.SetBehavior(Behavior{})
	return s
}

// modelList adds ids to the models served and returns their /models
// answer.
func (s *Server) modelList(ids []string) []byte {
	list := []byte(`{"object":"list","data":[`)
	for i, id := range ids {
		quoted, _ := json.Marshal(id) // a string always marshals
		obj := append([]byte(`{"id":`), quoted...)
		obj = append(obj, `,"object":"model","created":`+strconv.Itoa(modelsCreated)+`,"owned_by":"vigthoria"}`...)
		s.models[id] = model{quoted: quoted, object: obj}
		if i > 0 {
			list = append(list, ',')
		}
		list = append(list, obj...)
	}
	return append(list, "]}"...)
}

// SetBehavior replaces the behaviour for requests arriving from now on and
// restarts the FailCount budget. It panics if b.FailStatus is neither zero nor
// a 4xx or 5xx status.
func (s *Server) SetBehavior(b Behavior) {
	if b.FailStatus != 0 && (b.FailStatus < 400 || b.FailStatus > 599) {
		panic("standin: Behavior.FailStatus must be 0 or a 4xx/5xx status, got " + strconv.Itoa(b.FailStatus))
	}
	st := &behaviorState{b: b}
	st.failsLeft.Store(int64(b.FailCount))
	s.behavior.Store(st)
}

// Behavior returns the behaviour last set.
func (s *Server) Behavior() Behavior { return s.behavior.Load().b }

// Requests returns a copy of the requests recorded so far, oldest first.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Request, len(s.reqs))
	for i, r := range s.reqs {
		r.Header = r.Header.Clone()
		r.Body = bytes.Clone(r.Body)
		out[i] = r
	}
	return out
}

// Caps returns the cap each completion (chat or legacy) that was answered
// was given, oldest first; requests refused before an answer was planned
// are not in it.
func (s *Server) Caps() []Cap {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Cap(nil), s.caps...)
}

// noteCap records a planned answer's cap, unless the server records nothing.
func (s *Server) noteCap(c Cap) {
	if s.noRecord {
		return
	}
	s.mu.Lock()
	s.caps = append(s.caps, c)
	s.mu.Unlock()
}

// Count returns the number of requests received since New or Reset.
func (s *Server) Count() int { return int(s.count.Load()) }

// Active returns how many requests the server is answering now: a request
// the client abandoned leaves it once the server noticed.
func (s *Server) Active() int { return int(s.active.Load()) }

// Billed returns the tokens of the completions the server answered, as
// their usage counts them: an API bills every answer it started.
func (s *Server) Billed() (prompt, completion int64) { return s.prompt.Load(), s.answered.Load() }

// Written returns the completion tokens the server wrote out: a stream's
// content chunks as they were sent, a whole answer's tokens once written.
// Beside Billed, it tells how much of its answers the server generated
// before their clients went.
func (s *Server) Written() int64 { return s.written.Load() }

// Reset forgets the recorded requests, counters and usage figures, and
// restores the default behaviour.
func (s *Server) Reset() {
	s.SetBehavior(Behavior{})
	s.mu.Lock()
	s.reqs, s.caps = nil, nil
	s.mu.Unlock()
	s.count.Store(0)
	s.prompt.Store(0)
	s.answered.Store(0)
	s.written.Store(0)
	s.windowUsed.Store(0)
	s.maxActive.Store(s.active.Load())
	s.resetKeys()
}

// ServeHTTP answers one API request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.noteActive(s.active.Add(1))
	defer s.active.Add(-1)
	now := time.Now()
	in := s.getBuf()
	defer s.putBuf(in)
	body, readErr := readAll(http.MaxBytesReader(w, r.Body, maxBodyBytes), (*in)[:0])
	*in = body

	s.count.Add(1)
	s.countKey(r.Header.Get("Authorization"))
	if !s.noRecord {
		s.record(r, body, now)
	}
	st := s.behavior.Load()
	if !st.b.applies(r, body) {
		st = defaultBehavior
	}
	b := &st.b
	s.setCommonHeaders(w.Header(), now)
	for name, v := range b.Headers {
		w.Header()[http.CanonicalHeaderKey(name)] = v
	}
	if b.AccountHeaders {
		h := w.Header()
		h.Set("Openai-Organization", Organization)
		h.Set("Openai-Project", "proj_standin")
		h.Set("Openai-Processing-Ms", "12")
		h.Set("Openai-Version", "2020-10-01")
		h.Set("Set-Cookie", "__cf_bm=standin; path=/; HttpOnly; Secure")
	}

	if s.enforce != nil && s.authorized(r) {
		// Its own limits, over the whole answer, latency included.
		if !s.enforce.admit(w, now) {
			return
		}
		defer s.enforce.done()
	}
	if b.ContentType != "" {
		w = typedWriter{w, b.ContentType}
	}
	if b.Informational == http.StatusSwitchingProtocols {
		switchProtocols(w)
		return
	}
	if b.Informational >= 100 && b.Informational < 200 {
		w.Header().Set("Set-Cookie", "interim=1")
		w.WriteHeader(b.Informational)
		w.Header().Del("Set-Cookie")
	}
	switch {
	case b.StallHeaders:
		<-r.Context().Done()
	case b.Latency > 0 && !pause.For(r.Context(), b.Latency):
		// The client gave up; there is no one left to answer.
	case !s.authorized(r):
		msg := "Incorrect API key provided."
		if r.Header.Get("Authorization") == "" {
			msg = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
		}
		writeError(w, http.StatusUnauthorized, "authentication_error", "invalid_api_key", "", msg)
	case b.Redirect != "":
		w.Header().Set("Location", b.Redirect)
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusFound)
		_, _ = io.WriteString(w, "<a href=\""+b.Redirect+"\">Found</a>.\n")
	case st.fail():
		writeFailure(w, b)
	case b.Garbage:
		writeJSON(w, []byte("<html><body>Vigthoria stand-in: this is not JSON</body></html>\n"))
	case readErr != nil:
		if _, tooBig := errors.AsType[*http.MaxBytesError](readErr); tooBig {
			writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "request_too_large", "", "The request body is too large.")
			return
		}
		writeError(w, http.StatusBadRequest, "invalid_request_error", "invalid_body", "", "The request body could not be read.")
	default:
		s.route(w, r, body, b, now)
	}
}

func (s *Server) record(r *http.Request, body []byte, now time.Time) {
	req := Request{
		Method:   r.Method,
		Host:     r.Host,
		Path:     r.URL.Path,
		RawQuery: r.URL.RawQuery,
		Header:   r.Header.Clone(),
		Body:     bytes.Clone(body),
		At:       now,
	}
	s.mu.Lock()
	s.reqs = append(s.reqs, req)
	s.mu.Unlock()
}

// setCommonHeaders sets the headers every answer carries.
func (s *Server) setCommonHeaders(h http.Header, now time.Time) {
	id := append(make([]byte, 0, 20), "req_"...)
	// One backing array for all values instead of one slice per Set; the
	// keys are canonical, as direct assignment requires.
	v := []string{
		string(appendHex(id, s.seq.Add(1))),
		strconv.FormatInt(s.remaining(now.Unix()), 10),
		strconv.FormatInt((now.Unix()/60+1)*60, 10),
	}
	h["X-Request-Id"] = v[0:1:1]
	h["X-Ratelimit-Limit"] = s.limitHdr
	h["X-Ratelimit-Remaining"] = v[1:2:2]
	h["X-Ratelimit-Reset"] = v[2:3:3]
}

// remaining counts this request against the current minute and returns what
// is left of the advertised limit, never below zero.
func (s *Server) remaining(unix int64) int64 {
	minute := unix / 60
	if old := s.windowMinute.Load(); old != minute && s.windowMinute.CompareAndSwap(old, minute) {
		s.windowUsed.Store(0)
	}
	return max(0, s.limit-s.windowUsed.Add(1))
}

func (s *Server) authorized(r *http.Request) bool {
	scheme, key, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	// The scheme is case-insensitive (RFC 9110); the key is not.
	if !strings.EqualFold(scheme, "Bearer") || s.revokedKey(key) {
		return false
	}
	if subtle.ConstantTimeCompare([]byte(key), s.auth[len("Bearer "):]) == 1 {
		return true
	}
	_, ok := s.accounts[key]
	return ok
}

// modelsOf returns the /models answer for the key of r.
func (s *Server) modelsOf(r *http.Request) []byte {
	_, key, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if list, ok := s.accounts[key]; ok {
		return list
	}
	return s.list
}

func (s *Server) route(w http.ResponseWriter, r *http.Request, body []byte, b *Behavior, now time.Time) {
	rest, ok := strings.CutPrefix(r.URL.Path, s.base)
	if !ok {
		rest = "" // matches no route
	}
	switch rest {
	case "/chat/completions":
		if allow(w, r, http.MethodPost) {
			s.chat(w, r, body, b, now)
		}
	case "/completions":
		if allow(w, r, http.MethodPost) {
			s.completions(w, r, body, b, now)
		}
	case "/embeddings":
		if allow(w, r, http.MethodPost) {
			s.embeddings(w, body)
		}
	case "/models":
		if allow(w, r, http.MethodGet) {
			writeJSON(w, s.modelsOf(r))
		}
	case "/usage":
		if allow(w, r, http.MethodGet) {
			s.usage(w)
		}
	default:
		id, isModel := strings.CutPrefix(rest, "/models/")
		if !isModel || id == "" {
			writeError(w, http.StatusNotFound, "invalid_request_error", "unknown_url", "", "Invalid URL ("+r.Method+" "+r.URL.Path+")")
			return
		}
		if !allow(w, r, http.MethodGet) {
			return
		}
		m, known := s.models[id]
		if !known {
			writeModelNotFound(w, id)
			return
		}
		writeJSON(w, m.object)
	}
}

// allow answers 405 unless r uses method.
func allow(w http.ResponseWriter, r *http.Request, method string) bool {
	if r.Method == method {
		return true
	}
	w.Header().Set("Allow", method)
	writeError(w, http.StatusMethodNotAllowed, "invalid_request_error", "method_not_allowed", "",
		"Method "+r.Method+" is not allowed for "+r.URL.Path+"; use "+method+".")
	return false
}

// writeJSON writes a 200 answer with a JSON body.
func writeJSON(w http.ResponseWriter, body []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body) // a failed write means the client left
}

// writeError writes an answer in OpenAI's error shape; an empty param is null.
func writeError(w http.ResponseWriter, status int, typ, code, param, msg string) {
	var e struct {
		Error struct {
			Message string  `json:"message"`
			Type    string  `json:"type"`
			Param   *string `json:"param"`
			Code    string  `json:"code"`
		} `json:"error"`
	}
	e.Error.Message, e.Error.Type, e.Error.Code = msg, typ, code
	if param != "" {
		e.Error.Param = &param
	}
	body, _ := json.Marshal(&e) // strings and a pointer always marshal
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func writeModelNotFound(w http.ResponseWriter, id string) {
	writeError(w, http.StatusNotFound, "invalid_request_error", "model_not_found", "model",
		"The model `"+id+"` does not exist or you do not have access to it.")
}

// writeFailure answers with the injected b.FailStatus.
func writeFailure(w http.ResponseWriter, b *Behavior) {
	status := b.FailStatus
	typ, code, msg := "invalid_request_error", "injected_failure", http.StatusText(status)
	switch {
	case status == http.StatusUnauthorized:
		typ, code, msg = "authentication_error", "invalid_api_key", "Incorrect API key provided."
	case status == http.StatusForbidden:
		typ, code, msg = "permission_error", "permission_denied", "You are not allowed to use this resource."
	case status == http.StatusNotFound:
		code = "not_found"
	case status == http.StatusTooManyRequests:
		typ, code, msg = "rate_limit_error", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."
		if b.FailRequestOnly {
			typ, msg = "tokens", "Request too large for the tokens per min (TPM) limit. Please reduce your prompt."
		} else if b.Headers == nil {
			w.Header().Set("X-Ratelimit-Remaining", "0")
		}
	case status >= 500:
		typ, code, msg = "server_error", "server_error", "The server had an error while processing your request."
	}
	if (status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable) && b.Headers.Get("Retry-After") == "" {
		w.Header().Set("Retry-After", strconv.Itoa(b.RetryAfter))
	}
	if b.FailBody != "" {
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", strconv.Itoa(len(b.FailBody)))
		w.WriteHeader(status)
		_, _ = io.WriteString(w, b.FailBody)
		return
	}
	writeError(w, status, typ, code, "", msg)
}

// switchProtocols answers 101 on the raw connection and holds it until the
// client closes it.
func switchProtocols(w http.ResponseWriter) {
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	_, _ = buf.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	if buf.Flush() != nil {
		return
	}
	_, _ = io.Copy(io.Discard, conn)
}

// typedWriter gives an answer another Content-Type than its own.
type typedWriter struct {
	http.ResponseWriter
	contentType string
}

func (w typedWriter) WriteHeader(status int) {
	w.Header().Set("Content-Type", w.contentType)
	w.ResponseWriter.WriteHeader(status)
}

func (w typedWriter) Write(p []byte) (int, error) {
	if w.Header().Get("Content-Type") != w.contentType {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

func (w typedWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// padding is the shared buffer long events and padded answers are
// written from: JSON string content, needing no escape.
var padding = bytes.Repeat([]byte("x"), 64<<10)

// writePadding writes n bytes of padding to w, from the shared buffer.
func writePadding(w io.Writer, n int) error {
	for n > 0 {
		k, err := w.Write(padding[:min(n, len(padding))])
		if err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// getBuf and putBuf recycle body buffers across requests.
func (s *Server) getBuf() *[]byte {
	if b, ok := s.bufs.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 0, 4096)
	return &b
}

func (s *Server) putBuf(b *[]byte) {
	if cap(*b) <= 1<<20 { // let rare huge buffers go rather than pin them
		*b = (*b)[:0]
		s.bufs.Put(b)
	}
}

// readAll is io.ReadAll into a caller-supplied buffer.
func readAll(r io.Reader, b []byte) ([]byte, error) {
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}

// appendHex appends n as 12 zero-padded lowercase hex digits.
func appendHex(b []byte, n uint64) []byte {
	const digits = "0123456789abcdef"
	for shift := 44; shift >= 0; shift -= 4 {
		b = append(b, digits[n>>uint(shift)&0xf])
	}
	return b
}
