package proxy

import (
	"bytes"
	"context"
	"io"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// maxEventSize bounds what an sseBody holds back while it waits for the end
// of an event; a longer event is passed on as it comes, unaligned.
const maxEventSize = 1 << 20

var ssePool = sync.Pool{New: func() any { b := make([]byte, 0, 8<<10); return &b }}

var doneEvent = []byte("data: [DONE]")

// sseBody reads an upstream text/event-stream body and hands it on in whole
// events, flushed as soon as each is complete. Holding back a torn event
// lets it end a stream that the upstream broke off, or closed before
// "data: [DONE]", with a well-formed error event and a clean end, instead
// of a silent truncation the client may take for a complete answer.
//
// It is not safe for concurrent use; the reverse proxy reads it from one
// goroutine.
type sseBody struct {
	src    io.ReadCloser
	ctx    context.Context // the client's request: if it ended, errors pass through
	logger *zap.Logger

	bufp  *[]byte // pooled storage of buf
	buf   []byte  // bytes read from src and not yet returned
	start int     // buf[start:ready] are whole events to return
	ready int
	done  bool  // saw data: [DONE]
	err   error // returned once buf[start:ready] is empty
	call  *Call // nil: nothing to count or strip
}

func newSSEBody(ctx context.Context, src io.ReadCloser, logger *zap.Logger, c *Call) *sseBody {
	bufp := ssePool.Get().(*[]byte)
	return &sseBody{src: src, ctx: ctx, logger: logger, bufp: bufp, buf: (*bufp)[:0], call: c}
}

func (b *sseBody) Read(p []byte) (int, error) {
	for {
		if b.start < b.ready {
			n := copy(p, b.buf[b.start:b.ready])
			b.start += n
			return n, nil
		}
		if b.err != nil {
			return 0, b.err
		}
		b.fill()
	}
}

// fill reads once from src and moves ready past every event it completed.
func (b *sseBody) fill() {
	if b.buf == nil {
		b.err = io.ErrClosedPipe
		return
	}
	// Keep the torn tail, drop what was returned.
	if b.start > 0 {
		n := copy(b.buf, b.buf[b.start:])
		b.buf = b.buf[:n]
		b.ready -= b.start
		b.start = 0
	}
	if len(b.buf) == cap(b.buf) {
		b.buf = append(b.buf, 0)[:len(b.buf)]
	}
	n, err := b.src.Read(b.buf[len(b.buf):cap(b.buf)])
	scanFrom := max(len(b.buf)-2, b.ready)
	b.buf = b.buf[:len(b.buf)+n]
	b.scan(scanFrom)
	if b.ready > 0 && b.call != nil && b.call.Usage.FirstEvent == 0 {
		b.call.Usage.FirstEvent = time.Since(b.call.start)
	}
	if len(b.buf)-b.ready > maxEventSize {
		b.ready = len(b.buf)
	}
	switch {
	case err == nil:
	case err == io.EOF && b.done && b.ready == len(b.buf):
		b.err = io.EOF
	case b.ctx.Err() != nil:
		b.err = err // the client is gone: nobody to tell
	default:
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if c := b.logger.Check(zap.WarnLevel, "upstream stream broke off; ending it with an error event"); c != nil {
			c.Write(zap.Error(err))
		}
		b.buf = append(b.buf[:b.ready], errUpstreamStream.sseEvent()...)
		b.ready = len(b.buf)
		b.err = io.EOF
	}
}

// scan advances ready past each event that ends in buf[from:], noting
// [DONE]. An event ends with an empty line: "\n\n" or "\n\r\n".
func (b *sseBody) scan(from int) {
	for {
		i := bytes.IndexByte(b.buf[from:], '\n')
		if i < 0 {
			return
		}
		nl := from + i
		end := -1
		switch rest := b.buf[nl+1:]; {
		case len(rest) >= 1 && rest[0] == '\n':
			end = nl + 2
		case len(rest) >= 2 && rest[0] == '\r' && rest[1] == '\n':
			end = nl + 3
		}
		if end < 0 {
			from = nl + 1
			continue
		}
		end = b.event(b.ready, end)
		b.ready, from = end, end
	}
}

var emptyChoices = []byte(`"choices":[]`)

// event looks at the whole event buf[start:end]: notes [DONE], counts
// output, reads usage, and drops the usage-only chunk the client did not
// ask for. It returns where the event now ends.
func (b *sseBody) event(start, end int) int {
	ev := bytes.TrimLeft(b.buf[start:end], "\r\n")
	if bytes.HasPrefix(ev, doneEvent) {
		b.done = true
		return end
	}
	c := b.call
	if c == nil {
		return end
	}
	c.Usage.Chunks += wire.StreamedTokens(ev)
	if bytes.Contains(ev, wire.UsageKey) && parseUsage(ev, &c.Usage) && c.StripUsage && bytes.Contains(ev, emptyChoices) {
		b.buf = append(b.buf[:start], b.buf[end:]...)
		return start
	}
	return end
}

// Close closes the upstream body and returns the buffer to the pool.
func (b *sseBody) Close() error {
	err := b.src.Close()
	if b.bufp != nil {
		if cap(b.buf) <= 64<<10 {
			*b.bufp = b.buf[:0]
			ssePool.Put(b.bufp)
		}
		b.bufp, b.buf = nil, nil
	}
	return err
}
