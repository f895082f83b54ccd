package proxy

import (
	"context"
	"io"
	"net/http/httptrace"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// AnswerUsage is what one answer used, filled in by the tap as the answer passes
// through the proxy. It is read after Forward has returned.
type AnswerUsage struct {
	Status           int   // the upstream's status; 0 when none came
	PromptTokens     int64 // from the upstream's usage object
	CompletionTokens int64
	CachedTokens     int64 // of the prompt, read from the upstream's cache
	ReasoningTokens  int64 // of the completion, spent reasoning
	TotalTokens      int64
	Reported         bool // a usage object was seen
	// Which of its prompt, completion and total tokens the usage object
	// gave: one it left out is not a zero.
	HasPrompt, HasCompletion, HasTotal bool
	// Garbled is the start of a usage object whose figures are not
	// counts (negative, fractional, not numbers, or beyond any answer's
	// size), kept for the log; empty for a usage object read whole.
	Garbled string
	// Chunks is the output tokens a stream carried, guessed from its
	// deltas for charging a stream cut short: a token for each choice's
	// delta that carries output of any kind (content, refusal, reasoning,
	// tool or function calls, audio; a completion's text), and one more
	// for every 4 bytes past the first 16 of a long one.
	Chunks int64
	// ChunksAtUsage is Chunks when the last usage object was read: what a
	// stream carried after it is not in it.
	ChunksAtUsage int64
	Retries       int // upstream attempts repeated

	// Set when the request is policed, for charging an answer whose usage
	// never came: the prompt's estimate, and whether a stream was asked.
	Prompt int64
	Stream bool
	// state holds flags: sentFlag once the request was written to the
	// upstream (from then on the upstream may bill the server key for
	// it), which the transport's writing goroutine sets, hence atomic;
	// and how the answer ended, when it ended (endedHere, endedGone).
	state int32
	// caller is the caller's request context, which ends when the caller
	// leaves; nil when not watched.
	caller context.Context
	// Bytes is the length of a whole (JSON) answer's body, as read: no
	// answer carries more output tokens than it has bytes.
	Bytes int64
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

// The flags of AnswerUsage.state.
const (
	sentFlag  = 1 << iota // the request was written to the upstream
	endedHere             // the answer ended with the caller there
	endedGone             // the answer ended after the caller left
	answered              // the caller was answered before the call's end (late.go)
	cutFlag               // the proxy cut the call before its end: no detached call was free, it outlived its time, or fell silent
)

// AnsweredEarly reports whether the caller was answered before its call
// ended, at header_timeout or idle_timeout, while the call went on (or
// was cut).
func (u *AnswerUsage) AnsweredEarly() bool { return atomic.LoadInt32(&u.state)&answered != 0 }

// LeftUnread reports whether the proxy stopped reading the answer before
// its end, so that the upstream may bill more than it reported: its
// caller left first, or, for a call whose caller was answered early, the
// proxy cut it. A call that went on after such an answer and that the
// upstream itself ended (a reset, an error) was not left: that is the
// upstream's failure, as when its caller waits.
func (u *AnswerUsage) LeftUnread() bool {
	if s := atomic.LoadInt32(&u.state); s&answered != 0 {
		return s&cutFlag != 0
	}
	return u.CallerLeft()
}

func (u *AnswerUsage) mark(flag int32) { atomic.OrInt32(&u.state, flag) }

// CallerLeft reports whether the caller went away before its answer
// ended: when the answer's end was noted (noteEnd), whether the caller
// had left then; else whether it has left by now, before the request
// was settled. A caller that hangs up once it has its whole answer, as
// the SDKs do on a stream's error event, did not leave early.
func (u *AnswerUsage) CallerLeft() bool {
	switch s := atomic.LoadInt32(&u.state); {
	case s&endedHere != 0:
		return false
	case s&endedGone != 0:
		return true
	}
	return u.caller != nil && u.caller.Err() != nil
}

// noteEnd notes that the answer ended now, and whether its caller was
// still there.
func (u *AnswerUsage) noteEnd() {
	flag := int32(endedHere)
	if u.caller != nil && u.caller.Err() != nil {
		flag = endedGone
	}
	u.mark(flag)
}

// Sent reports whether the request was written to the upstream, by the
// last attempt that was not retried.
func (u *AnswerUsage) Sent() bool { return atomic.LoadInt32(&u.state)&sentFlag != 0 }

// MarkSent notes whether the request was written to the upstream.
func (u *AnswerUsage) MarkSent(sent bool) {
	if sent {
		u.mark(sentFlag)
	} else {
		atomic.AndInt32(&u.state, ^int32(sentFlag))
	}
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
	// Model is the request's model, "" for none: the upstream's per-model
	// limits in its answer speak of it.
	Model string
	// Caller is the ID of the client charged for the call: it has its
	// own share of the calls that go on after their caller left.
	Caller string
	// Usage is filled in as the answer passes.
	Usage AnswerUsage
	// Hold, when set, waits out the upstream's word that every server
	// key is spent before a retry, in the queue's order and pace, in
	// place of sleeping the 429's own wait; false when the request may
	// wait no longer (or its caller left): the 429 is then its answer.
	Hold func(ctx context.Context) bool

	streamed atomic.Int64  // Usage.Chunks, for Streamed
	key      *poolKey      // the server key the call must use; nil: the pool picks
	start    time.Time     // when Forward began, for the latencies
	answer   checkedAnswer // a JSON answer, once read whole
	stream   callStream    // a stream's body
	watch    watch         // on the caller, for a request the upstream may bill
	late     *lateCall     // set when the call goes on after its caller was answered (late.go)
	logger   *zap.Logger   // the transport's, for a stream broken off
	trace    httptrace.ClientTrace
}

// Streamed returns the output tokens the call's stream carried so far,
// as Usage.Chunks counts them; unlike it, it may be read while the stream
// runs, from any goroutine.
func (c *Call) Streamed() int64 { return c.streamed.Load() }

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
	held  int64 // bytes of its start counted in the process's answers
}

func (j *jsonTap) Read(p []byte) (int, error) {
	n, err := j.src.Read(p)
	if n > 0 {
		j.keep(p[:n])
		j.usage.Bytes += int64(n)
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

// Close reads the rest of an answer closed before its end, for its usage,
// as callStream does.
func (j *jsonTap) Close() error {
	if !j.done {
		_, _ = io.Copy(io.Discard, j)
	}
	wire.Release(j.held)
	j.held = 0
	return j.src.Close()
}

// parseUsage reads the last usage object in b into u (wire.ParseUsage),
// and reports whether there was one.
func parseUsage(b []byte, u *AnswerUsage) bool {
	r, ok := wire.ParseUsage(b)
	if !ok {
		return false
	}
	u.PromptTokens, u.CompletionTokens, u.CachedTokens, u.ReasoningTokens, u.TotalTokens = r.Prompt, r.Completion, r.Cached, r.Reasoning, r.Total
	u.HasPrompt, u.HasCompletion, u.HasTotal = r.HasPrompt, r.HasCompletion, r.HasTotal
	u.Reported, u.Garbled, u.ChunksAtUsage = true, r.Garbled, u.Chunks
	return true
}
