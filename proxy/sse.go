package proxy

import (
	"bytes"
	"context"
	"io"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// newSSEBody returns the body that hands an upstream stream on to the
// client in whole events (wire.SSE), counting and stripping for c, or
// only ending a broken stream well when c is nil; limit bounds what the
// answers of the process hold (wire.Hold).
func newSSEBody(ctx context.Context, src io.ReadCloser, logger *zap.Logger, c *Call, limit int64) io.ReadCloser {
	if c == nil {
		return wire.NewSSE(ctx, src, &brokenStreamTap{logger}, limit)
	}
	c.logger = logger
	c.stream.Init(ctx, src, (*callTap)(c), limit)
	return &c.stream
}

// callStream is a call's stream body, kept in the call. Closed before its
// end, when the proxy stops passing it on because the caller left, it
// reads the rest first, for its usage: the upstream bills the whole
// answer of a request it received. What bounds the reading is what bounds
// the upstream request: idle_timeout, and the call's watch (detach.go),
// which cuts it at once unless the call may go on detached.
type callStream struct{ wire.SSE }

func (s *callStream) Close() error {
	s.Drain()
	return s.SSE.Close()
}

// brokenStreamTap ends a broken stream with an error event, and logs it.
type brokenStreamTap struct{ logger *zap.Logger }

func (*brokenStreamTap) Event([]byte) bool { return false }
func (*brokenStreamTap) Ready()            {}
func (*brokenStreamTap) Done()             {}

func (t *brokenStreamTap) Broke(err error) []byte { return endBroken(t.logger, err) }

// endBroken logs a stream the upstream broke off, and returns the event
// that ends it for the client.
func endBroken(logger *zap.Logger, err error) []byte {
	if c := logger.Check(zap.WarnLevel, "upstream stream broke off; ending it with an error event"); c != nil {
		c.Write(zap.Error(err))
	}
	return sseEvent(errUpstreamStream)
}

// callTap is a Call as its stream's tap: it counts the output, reads the
// usage, and drops the usage-only chunk the client did not ask for. A
// conversion of the call's pointer, it costs no allocation.
type callTap Call

var emptyChoices = []byte(`"choices":[]`)

func (t *callTap) Event(ev []byte) bool {
	c := (*Call)(t)
	c.Usage.Chunks += wire.StreamedTokens(ev)
	return bytes.Contains(ev, wire.UsageKey) && parseUsage(ev, &c.Usage) && c.StripUsage && bytes.Contains(ev, emptyChoices)
}

func (t *callTap) Ready() {
	if t.Usage.FirstEvent == 0 {
		t.Usage.FirstEvent = time.Since(t.start)
	}
	t.streamed.Store(t.Usage.Chunks) // for the ledger, while the stream runs: once a read
}

// Done notes the end of a whole stream before its [DONE] goes to the
// caller, who may hang up once it has it.
func (t *callTap) Done() { t.Usage.noteEnd() }

// Broke ends a stream the upstream broke off: its end is noted before
// the event that ends it goes to the caller, who may hang up once it
// has it, and is then not one who left early.
func (t *callTap) Broke(err error) []byte {
	t.Usage.noteEnd()
	return endBroken(t.logger, err)
}

// sseEvent frames e as one server-sent event, for streams that already
// started when the failure happened.
func sseEvent(e *api.Error) []byte {
	b := append(make([]byte, 0, 160+len(e.Message)), "data: "...)
	return append(e.AppendJSON(b), "\n\n"...)
}
