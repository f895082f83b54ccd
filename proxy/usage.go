package proxy

import (
	"bytes"
	"context"
	"io"
	"math"
	"net/http/httptrace"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// AnswerUsage is what one answer used, filled in by the tap as the answer passes
// through the proxy. It is read after Forward has returned.
type AnswerUsage struct {
	Status           int   // the upstream's status; 0 when none came
	PromptTokens     int64 // from the upstream's usage object
	CompletionTokens int64
	CachedTokens     int64 // of the prompt, read from the upstream's cache
	ReasoningTokens  int64 // of the completion, spent reasoning
	Reported         bool  // a usage object was seen
	// Garbled is the start of a usage object whose figures are not
	// counts (negative, fractional, not numbers, or beyond any answer's
	// size), kept for the log; empty for a usage object read whole.
	Garbled string
	// Chunks is the output tokens a stream carried, guessed from its
	// deltas for charging a stream cut short: a token for each choice's
	// delta that carries output of any kind (content, refusal, reasoning,
	// tool or function calls, audio; a completion's text), and one more
	// for every 4 bytes past the first 16 of a long one.
	Chunks  int64
	Retries int // upstream attempts repeated

	// Set when the request is policed, for charging an answer whose usage
	// never came: the prompt's estimate, and whether a stream was asked.
	Prompt int64
	Stream bool
	// caller is the caller's request context, which ends when the caller
	// leaves; nil when not watched.
	caller context.Context
	// sent is 1 once the request was written to the upstream (from then
	// on the upstream may bill the server key for it). The transport's
	// writing goroutine sets it, hence atomic.
	sent int32
	// HeaderLatency is the time until the upstream's response headers,
	// retries included; FirstEvent the time until a stream's first event
	// was ready for the client.
	HeaderLatency, FirstEvent time.Duration
	// Cache is how GET /v1/models was answered: HIT, MISS or STALE.
	Cache string
}

// Watch notes the caller's request context, to tell later whether the
// caller left.
func (u *AnswerUsage) Watch(ctx context.Context) { u.caller = ctx }

// CallerLeft reports whether the caller went away: its request context
// ended before the request was settled.
func (u *AnswerUsage) CallerLeft() bool { return u.caller != nil && u.caller.Err() != nil }

// Sent reports whether the request was written to the upstream, by the
// last attempt that was not retried.
func (u *AnswerUsage) Sent() bool { return atomic.LoadInt32(&u.sent) == 1 }

// MarkSent notes whether the request was written to the upstream.
func (u *AnswerUsage) MarkSent(sent bool) {
	var v int32
	if sent {
		v = 1
	}
	atomic.StoreInt32(&u.sent, v)
}

// Total returns prompt plus completion tokens.
func (u *AnswerUsage) Total() int64 { return u.PromptTokens + u.CompletionTokens }

// Call is one request's way through the upstream side: what the caller
// tells it, and what it counts. Forward hands it to the transport, which
// fills Usage in as the answer passes.
type Call struct {
	// Body is the request body as it goes upstream, replayed on a retry;
	// nil for none.
	Body []byte
	// StripUsage removes the usage-only chunk of a stream: the proxy asked
	// for it, the client did not.
	StripUsage bool
	// Usage is filled in as the answer passes.
	Usage AnswerUsage

	start  time.Time     // when Forward began, for the latencies
	answer checkedAnswer // a JSON answer, once read whole
	trace  httptrace.ClientTrace
}

// traceUpstream returns the client trace of the call's request going
// upstream: it refuses a 1xx other than 100, and marks c.Usage sent once
// the request was written. The transport calls it once per call.
func (c *Call) traceUpstream() context.Context {
	c.trace = httptrace.ClientTrace{WroteRequest: c.wroteRequest, Got1xxResponse: refuseInterim}
	return httptrace.WithClientTrace(context.Background(), &c.trace)
}

func (c *Call) wroteRequest(info httptrace.WroteRequestInfo) {
	if info.Err == nil {
		c.Usage.MarkSent(true)
	}
}

// String keeps the call out of placeholders and logs that print Caddy's
// request variables, where it travels.
func (*Call) String() string { return "vigthoria call" }

// callVar names the call among Caddy's request variables. The variables
// travel in the context of Caddy's own copy of the request, so passing the
// call there costs no copy of the request, as a context value would.
const callVar = "vigthoria.call"

// callFrom returns the call of a request, or nil for none.
func callFrom(ctx context.Context) *Call {
	c, _ := caddyhttp.GetVar(ctx, callVar).(*Call)
	return c
}

// jsonTailSize is how much of a JSON answer's end is kept to find its
// usage object, which OpenAI-style APIs put last.
const jsonTailSize = 4 << 10

// jsonTap passes a JSON answer through unchanged, keeping its tail, and
// reads the usage object from it at the end.
type jsonTap struct {
	src   io.ReadCloser
	usage *AnswerUsage
	tail  []byte
	done  bool
}

func (j *jsonTap) Read(p []byte) (int, error) {
	n, err := j.src.Read(p)
	if n > 0 {
		j.keep(p[:n])
	}
	if err == io.EOF && !j.done {
		j.done = true
		parseUsage(j.tail, j.usage)
	}
	return n, err
}

func (j *jsonTap) keep(b []byte) {
	if len(b) >= jsonTailSize {
		j.tail = append(j.tail[:0], b[len(b)-jsonTailSize:]...)
		return
	}
	if over := len(j.tail) + len(b) - jsonTailSize; over > 0 {
		j.tail = append(j.tail[:0], j.tail[over:]...)
	}
	j.tail = append(j.tail, b...)
}

func (j *jsonTap) Close() error { return j.src.Close() }

var usageKey = []byte(`"usage":`)

// The counts the reader takes from a usage object, indexes of
// usageFigures.n.
const (
	promptFigure     = iota // prompt_tokens
	completionFigure        // completion_tokens
	cachedFigure            // prompt_tokens_details.cached_tokens
	reasoningFigure         // completion_tokens_details.reasoning_tokens
	figureCount
)

// usageFigures is what a usage object says, read as encoding/json would
// decode it into pointers: null clears a figure, a later value replaces an
// earlier one, and a value that is not a number at all (or a details
// field that is not an object) garbles the object whatever follows.
type usageFigures struct {
	n        [figureCount]int64
	seen     [figureCount]bool
	notCount [figureCount]bool // a number, but negative, fractional or too large
	notJSON  bool              // a value encoding/json could not decode
}

func (f *usageFigures) garbled() bool {
	return f.notJSON || f.notCount != [figureCount]bool{}
}

// maxGarbledText bounds the text of a garbled usage object kept for the log.
const maxGarbledText = 256

// parseUsage reads the last "usage":{…} object in b into u, without
// decoding the rest: a full decode of every answer would cost more than
// the proxy itself. The object is read as JSON: its fields in any order,
// the two details objects for their cached and reasoning counts, other
// nested values skipped whole, and nothing taken from an object that is
// cut short or malformed. It reports whether a usage object was read; one
// whose figures are not counts is read as garbled, and keeps its text.
func parseUsage(b []byte, u *AnswerUsage) bool {
	i := bytes.LastIndex(b, usageKey)
	if i < 0 {
		return false
	}
	start := skipSpace(b, i+len(usageKey))
	if start >= len(b) || b[start] != '{' {
		return false // "usage":null
	}
	obj := b[start:skipValue(b, start)]
	if !validJSON(obj) {
		return false
	}
	var f usageFigures
	for key, v, k, ok := member(obj, 0); ok; key, v, k, ok = member(obj, k) {
		switch string(key) {
		case "prompt_tokens":
			f.read(promptFigure, v)
		case "completion_tokens":
			f.read(completionFigure, v)
		case "prompt_tokens_details":
			f.readDetail(cachedFigure, "cached_tokens", v)
		case "completion_tokens_details":
			f.readDetail(reasoningFigure, "reasoning_tokens", v)
		}
	}
	if !f.seen[promptFigure] && !f.seen[completionFigure] && !f.garbled() {
		return false
	}
	u.PromptTokens, u.CompletionTokens = f.n[promptFigure], f.n[completionFigure]
	u.CachedTokens, u.ReasoningTokens = f.n[cachedFigure], f.n[reasoningFigure]
	u.Reported, u.Garbled = true, ""
	if f.garbled() {
		u.Garbled = string(obj[:min(len(obj), maxGarbledText)])
	}
	return true
}

// member returns the key and value of the member of obj, a valid JSON
// object, that starts at or after k (0: the first), and where to look for
// the next; ok is false past the last.
func member(obj []byte, k int) (key, value []byte, next int, ok bool) {
	if k == 0 {
		k = skipSpace(obj, 1)
	}
	if k >= len(obj) || obj[k] != '"' {
		return nil, nil, k, false
	}
	keyEnd := skipString(obj, k)
	v := skipSpace(obj, skipSpace(obj, keyEnd)+1) // past ':'
	vEnd := skipValue(obj, v)
	if next = skipSpace(obj, vEnd); next < len(obj) && obj[next] == ',' {
		next = skipSpace(obj, next+1)
	}
	return keyName(obj[k:keyEnd]), obj[v:vEnd], next, true
}

// read takes figure i from the JSON value v.
func (f *usageFigures) read(i int, v []byte) {
	f.n[i], f.seen[i], f.notCount[i] = 0, false, false
	if v[0] == 'n' { // null
		return
	}
	switch n, kind := tokenCount(v); kind {
	case aCount:
		f.n[i], f.seen[i] = n, true
	case notACount:
		f.seen[i], f.notCount[i] = true, true
	default:
		f.notJSON = true
	}
}

// readDetail takes figure i from the field name of v, a details object.
func (f *usageFigures) readDetail(i int, name string, v []byte) {
	switch v[0] {
	case 'n':
		f.n[i], f.seen[i], f.notCount[i] = 0, false, false
		return
	case '{':
	default:
		f.notJSON = true
		return
	}
	for key, dv, k, ok := member(v, 0); ok; key, dv, k, ok = member(v, k) {
		if string(key) == name {
			f.read(i, dv)
		}
	}
}

// maxReportedTokens bounds a count the upstream reports for one answer;
// past it the count is garbled. The proxy's own bound per request is far
// lower (see charge), but this one keeps every sum of reported counts
// exact and far from overflowing.
const maxReportedTokens = 1 << 40

// What a reported figure is.
const (
	aCount    = iota
	notACount // a number, but negative, fractional or too large
	notANumber
)

// tokenCount reads a JSON value that counts tokens: digits, or a number
// with a fraction or exponent whose value is a whole count (1e6).
func tokenCount(v []byte) (n int64, kind int) {
	if n, end, ok := leadingDigits(v, maxReportedTokens); ok && end == len(v) {
		return n, aCount
	}
	f, err := strconv.ParseFloat(string(v), 64)
	switch {
	case err != nil: // a string, an object, or beyond float64 (1e400)
		return 0, notANumber
	case f < 0 || f > maxReportedTokens || f != math.Trunc(f):
		return 0, notACount
	}
	return int64(f), aCount
}
