package wire

import (
	"bytes"
	"context"
	"io"
	"sync"
)

// MaxEventSize bounds what an SSE body holds back while it waits for the end
// of an event; a longer event is passed on as it comes, unaligned.
const MaxEventSize = 1 << 20

var ssePool = sync.Pool{New: func() any { b := make([]byte, 0, 8<<10); return &b }}

var doneEvent = []byte("data: [DONE]")

// EventTap is told what passes through an SSE body. Its methods run on
// the goroutine that reads the body.
type EventTap interface {
	// Event is told each whole event but "data: [DONE]", and reports
	// whether to drop it from the stream.
	Event(ev []byte) (drop bool)
	// Ready is told after each read of the upstream that left whole
	// events ready for the client; the first time, the stream's first.
	Ready()
	// Broke is told that the upstream broke the stream off, or ended it
	// before "data: [DONE]", while the client was still there. It returns
	// the event that ends the stream instead.
	Broke(err error) (event []byte)
}

// SSE reads an upstream text/event-stream body and hands it on in whole
// events, flushed as soon as each is complete. Holding back a torn event
// lets it end a stream that the upstream broke off, or closed before
// "data: [DONE]", with a well-formed error event and a clean end, instead
// of a silent truncation the client may take for a complete answer.
//
// It is not safe for concurrent use; the reverse proxy reads it from one
// goroutine.
type SSE struct {
	src io.ReadCloser
	ctx context.Context // the client's request: if it ended, errors pass through
	tap EventTap

	bufp  *[]byte // pooled storage of buf
	buf   []byte  // bytes read from src and not yet returned
	start int     // buf[start:ready] are whole events to return
	ready int
	done  bool  // saw data: [DONE]
	err   error // returned once buf[start:ready] is empty
}

// NewSSE returns the SSE body reading src for the client whose request is
// ctx, telling tap what passes.
func NewSSE(ctx context.Context, src io.ReadCloser, tap EventTap) *SSE {
	b := new(SSE)
	b.Init(ctx, src, tap)
	return b
}

// Init makes b the SSE body reading src, as NewSSE does, for a body kept
// in a larger struct.
func (b *SSE) Init(ctx context.Context, src io.ReadCloser, tap EventTap) {
	bufp := ssePool.Get().(*[]byte)
	*b = SSE{src: src, ctx: ctx, tap: tap, bufp: bufp, buf: (*bufp)[:0]}
}

// Drain reads what is left of the stream and drops it, telling the tap of
// each event as Read would: the end of an answer nobody reads any more
// still carries its usage. It returns once src ended or failed.
func (b *SSE) Drain() {
	for b.err == nil {
		b.start = b.ready
		b.fill()
	}
}

func (b *SSE) Read(p []byte) (int, error) {
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
func (b *SSE) fill() {
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
	if b.ready > 0 {
		b.tap.Ready()
	}
	if len(b.buf)-b.ready > MaxEventSize {
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
		b.buf = append(b.buf[:b.ready], b.tap.Broke(err)...)
		b.ready = len(b.buf)
		b.err = io.EOF
	}
}

// scan advances ready past each event that ends in buf[from:], noting
// [DONE]. An event ends with an empty line: "\n\n" or "\n\r\n".
func (b *SSE) scan(from int) {
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

// event looks at the whole event buf[start:end]: notes [DONE], tells the
// tap of any other, and drops it if the tap says so. It returns where the
// event now ends.
func (b *SSE) event(start, end int) int {
	ev := bytes.TrimLeft(b.buf[start:end], "\r\n")
	if bytes.HasPrefix(ev, doneEvent) {
		b.done = true
		return end
	}
	if b.tap.Event(ev) {
		b.buf = append(b.buf[:start], b.buf[end:]...)
		return start
	}
	return end
}

// Close closes the upstream body and returns the buffer to the pool.
func (b *SSE) Close() error {
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
