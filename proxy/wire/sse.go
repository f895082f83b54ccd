package wire

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
)

// MaxEventSize bounds one event of a stream, its blank line included: a
// longer event ends the stream (ErrEventTooLarge), since no API's event
// comes near it and holding it would let an upstream fill memory.
const MaxEventSize = 1 << 20

// firstBuffer is the size of a stream's first buffer, the only size the
// pool keeps: a buffer grown for a long event is dropped with its stream.
const firstBuffer = 8 << 10

var ssePool = sync.Pool{New: func() any { b := make([]byte, 0, firstBuffer); return &b }}

var doneEvent = []byte("data: [DONE]")

// Errors that end a stream early, told to the tap's Broke.
var (
	// ErrEventTooLarge is an event longer than MaxEventSize.
	ErrEventTooLarge = errors.New("the upstream sent an event longer than 1 MiB")
	// ErrAnswersBusy is an event that would take the answers held in
	// memory over their bound (see Hold).
	ErrAnswersBusy = errors.New("the answers held in memory are at their bound")
)

// EventTap is told what passes through an SSE body. Its methods run on
// the goroutine that reads the body.
type EventTap interface {
	// Event is told each whole event but "data: [DONE]", and reports
	// whether to drop it from the stream.
	Event(ev []byte) (drop bool)
	// Done is told that the stream's "data: [DONE]" came, before it is
	// handed on: the answer is whole.
	Done()
	// Ready is told after each read of the upstream that left whole
	// events ready for the client; the first time, the stream's first.
	Ready()
	// Broke is told that the upstream broke the stream off, or ended it
	// before "data: [DONE]", or sent an event the stream cannot hold,
	// while the client was still there. It returns the event that ends
	// the stream instead.
	Broke(err error) (event []byte)
}

// SSE reads an upstream text/event-stream body and hands it on in whole
// events, flushed as soon as each is complete. Holding back a torn event
// lets it end a stream that the upstream broke off, or closed before
// "data: [DONE]", with a well-formed error event and a clean end, instead
// of a silent truncation the client may take for a complete answer.
//
// Lines may end with CRLF, LF or CR alone, as the format allows; a CR
// alone is passed on as LF, so that the client's parser needs to know
// only the common two. Its buffer starts at 8 KiB and grows for a long
// event, up to MaxEventSize, while the process's answers have room for
// it (see Hold); past either bound the stream ends as broken.
//
// It is not safe for concurrent use; the reverse proxy reads it from one
// goroutine.
type SSE struct {
	src io.ReadCloser
	ctx context.Context // the client's request: if it ended, errors pass through
	tap EventTap
	// limit bounds the bytes all answers of the process may hold (Hold).
	limit int64

	bufp  *[]byte // pooled storage of buf, while buf is the pool's
	buf   []byte  // bytes read from src and not yet returned
	held  int64   // bytes of buf counted in the process's answers
	start int     // buf[start:ready] are whole events to return
	ready int
	done  bool  // saw data: [DONE]
	cr    bool  // the last byte read was a CR, passed on as LF: an LF next is its pair
	err   error // returned once buf[start:ready] is empty
}

// NewSSE returns the SSE body reading src for the client whose request is
// ctx, telling tap what passes; limit bounds the bytes that the answers
// of the process may hold, as Hold does.
func NewSSE(ctx context.Context, src io.ReadCloser, tap EventTap, limit int64) *SSE {
	b := new(SSE)
	b.Init(ctx, src, tap, limit)
	return b
}

// Init makes b the SSE body reading src, as NewSSE does, for a body kept
// in a larger struct.
func (b *SSE) Init(ctx context.Context, src io.ReadCloser, tap EventTap, limit int64) {
	bufp := ssePool.Get().(*[]byte)
	*b = SSE{src: src, ctx: ctx, tap: tap, limit: limit, bufp: bufp, buf: (*bufp)[:0], held: firstBuffer}
	Take(firstBuffer)
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
		if err := b.grow(); err != nil {
			b.end(err)
			return
		}
	}
	n, err := b.src.Read(b.buf[len(b.buf):cap(b.buf)])
	scanFrom := max(len(b.buf)-2, b.ready)
	b.buf = b.buf[:len(b.buf)+n]
	b.lineEnds(len(b.buf) - n)
	b.scan(scanFrom)
	if b.ready > 0 {
		b.tap.Ready()
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
		b.end(err)
	}
}

// end ends the stream after its whole events: with the tap's event for
// err while the client is there, at once when it is gone.
func (b *SSE) end(err error) {
	if b.ctx.Err() != nil {
		b.err = err
		return
	}
	b.buf = append(b.buf[:b.ready], b.tap.Broke(err)...)
	b.ready = len(b.buf)
	b.err = io.EOF
}

// grow doubles the full buffer, which then holds one torn event (fill
// dropped what was returned), up to MaxEventSize, if the process's
// answers have room for it.
func (b *SSE) grow() error {
	size := min(2*cap(b.buf), MaxEventSize)
	if size == cap(b.buf) {
		return ErrEventTooLarge
	}
	more := int64(size - cap(b.buf))
	if !Hold(more, b.limit) {
		return ErrAnswersBusy
	}
	b.held += more
	grown := make([]byte, len(b.buf), size)
	copy(grown, b.buf)
	b.buf = grown
	return nil
}

// lineEnds passes each CR alone in buf[from:] on as LF. A CR that ends
// what was read is taken as a line's end at once, so that an event it
// completes is not held back; an LF that follows it in the next read is
// its pair, and is dropped.
func (b *SSE) lineEnds(from int) {
	if b.cr && from < len(b.buf) && b.buf[from] == '\n' {
		b.buf = append(b.buf[:from], b.buf[from+1:]...)
	}
	if from < len(b.buf) {
		b.cr = false
	}
	for i := from; ; {
		j := bytes.IndexByte(b.buf[i:], '\r')
		if j < 0 {
			return
		}
		i += j
		switch {
		case i+1 == len(b.buf):
			b.buf[i], b.cr = '\n', true
			return
		case b.buf[i+1] != '\n':
			b.buf[i] = '\n'
		}
		i++
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
		b.tap.Done()
		return end
	}
	if b.tap.Event(ev) {
		b.buf = append(b.buf[:start], b.buf[end:]...)
		return start
	}
	return end
}

// Close closes the upstream body, returns a first-size buffer to the
// pool (one grown for a long event is left to the collector) and its
// bytes to the process's answers.
func (b *SSE) Close() error {
	err := b.src.Close()
	if b.bufp != nil {
		if cap(b.buf) == firstBuffer {
			*b.bufp = b.buf[:0]
			ssePool.Put(b.bufp)
		}
		Release(b.held)
		b.bufp, b.buf, b.held = nil, nil, 0
	}
	return err
}
