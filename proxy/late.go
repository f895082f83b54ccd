package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// A call may go on after its caller was answered: when header_timeout
// passes, the caller gets its 504, and when a stream falls silent for
// idle_timeout, its stream ends with an error event; but the upstream
// received the request and may bill it, so the call goes on as a
// detached one (detach.go), read to its usage on a goroutine of its own,
// and is settled when it ends (Call.WhenOver) and charged what the
// upstream reports.

// errHeaderTimeout is the upstream's response headers not coming within
// header_timeout.
var errHeaderTimeout = errors.New("the upstream's response headers did not come within header_timeout")

// GoesOn reports whether the call goes on after Forward returned: its
// caller was answered (504 at header_timeout, or its stream's end at
// idle_timeout), and the upstream is still answering it. What it used is
// known, and it may be settled, once it is over (WhenOver).
func (c *Call) GoesOn() bool { return c.late != nil }

// AnsweredWith is the status a call that goes on gave its caller: 0 for
// none of the upstream's (a 504), else the upstream's (a stream's 200).
func (c *Call) AnsweredWith() int { return c.late.status }

// WhenOver runs settle once a call that goes on is over: at once if it
// is, else on the goroutine that read it, when it ends.
func (c *Call) WhenOver(settle func()) {
	l := c.late
	l.mu.Lock()
	if !l.over {
		l.settle = settle
		l.mu.Unlock()
		return
	}
	l.mu.Unlock()
	settle()
}

// lateCall is a call that goes on after its caller was answered, and
// what is to run when it is over.
type lateCall struct {
	status int // what its caller was answered with (AnsweredWith)
	mu     sync.Mutex
	over   bool
	settle func()
}

// end ends a call that went on: its body was read and closed. It gives
// back its detached place, and settles it if its settle came.
func (c *Call) end() {
	c.finish()
	l := c.late
	l.mu.Lock()
	l.over = true
	settle := l.settle
	l.mu.Unlock()
	if settle != nil {
		settle()
	}
}

// answerNow decides the call's fate when its caller is to be answered
// before its end, for cause (header_timeout or idle_timeout), while it
// waits: the call goes on detached, as if the caller had left then, when
// it was sent and may (the upstream received it and may bill it; its
// usage comes with its answer); else it is cut. It reports whether the
// call goes on, and whether its caller was still waiting: one that left
// first has its call decided already, and nobody to answer. A call that
// goes on is marked so (GoesOn) with status, what its caller gets.
func (c *Call) answerNow(cause error, status int) (goesOn, waiting bool) {
	w := &c.watch
	w.mu.Lock()
	if w.state != watching {
		w.mu.Unlock()
		return false, false
	}
	c.Usage.mark(answered)
	after := c.decide(cause)
	goesOn = w.state == detached
	w.mu.Unlock()
	after.run()
	if goesOn {
		c.late = &lateCall{status: status}
	}
	return goesOn, true
}

// roundTripped is what a round trip came to.
type roundTripped struct {
	res *http.Response
	err error
	// goesOn: header_timeout passed, and the call goes on; done brings
	// what it comes to.
	goesOn bool
	done   <-chan roundTripped
}

// timedRoundTrip is roundTrip with each attempt's wait for its answer's
// headers bounded by header_timeout (headerClock). When it passes, a
// request that its caller waits for and the upstream received goes on
// (answerNow): the caller is answered 504 while goOn reads the answer to
// its usage. Any other request is cut, and answered 504.
func (t *keyTransport) timedRoundTrip(out *http.Request, c *Call, cancel context.CancelCauseFunc) roundTripped {
	trip := timedTrips.Get().(*timedTrip)
	trip.clock.limit = t.headerTimeout
	clock, done := &trip.clock, trip.done
	go func() {
		var r roundTripped
		defer func() {
			// The handler waits for it: a panic is its error, as
			// net/http would make one of it in the handler.
			if v := recover(); v != nil {
				t.logger.Error("panic in an upstream round trip", zap.Any("panic", v), zap.Stack("stack"))
				r = roundTripped{err: fmt.Errorf("panic in the upstream round trip: %v", v)}
			}
			done <- r
		}()
		r.res, r.err = t.roundTrip(out, c, clock)
	}()
	// Once its answer is taken, the goroutine is done with the clock and
	// the channel: they serve the next request, the clock stopped (an
	// attempt that panicked left it running).
	answered := func(r roundTripped) roundTripped {
		clock.stop()
		timedTrips.Put(trip)
		return r
	}
	select {
	case r := <-done:
		return answered(r)
	case <-clock.timer.C:
	}
	select {
	case r := <-done: // the headers came as the clock ran out
		return answered(r)
	default:
	}
	if c == nil || c.Usage.caller == nil {
		cancel(errHeaderTimeout)
	} else {
		switch goesOn, waiting := c.answerNow(errHeaderTimeout, 0); {
		case goesOn:
			return roundTripped{goesOn: true, done: done}
		case !waiting:
			// Its caller left first: its call was decided then, and
			// nobody waits for a 504.
			return answered(<-done)
		}
	}
	// Cut: what comes now is the cut's error, or an answer that came
	// just as it was cut.
	if r := answered(<-done); r.res != nil {
		r.res.Body.Close()
	}
	return roundTripped{err: errHeaderTimeout}
}

// timedTrip is what a timed round trip waits with: the clock of its
// attempts, and the channel its goroutine answers on.
type timedTrip struct {
	clock headerClock
	done  chan roundTripped
}

// timedTrips recycles timedTrips whose goroutine answered and whose
// answer was taken. A stopped timer holds no stale tick (Go 1.23's
// timers), so the next request's clock starts clean.
var timedTrips = sync.Pool{New: func() any {
	trip := &timedTrip{clock: headerClock{timer: time.NewTimer(time.Hour)}, done: make(chan roundTripped, 1)}
	trip.clock.timer.Stop()
	return trip
}}

// headerClock times each attempt's wait for its answer's headers: armed
// as the attempt starts, stopped once it is answered or failed, so that
// the waits between retries are max_wait's to bound, not header_timeout's.
// nil times nothing.
type headerClock struct {
	timer *time.Timer
	limit time.Duration
}

func (h *headerClock) arm() {
	if h != nil {
		h.timer.Reset(h.limit)
	}
}

func (h *headerClock) stop() {
	if h != nil {
		h.timer.Stop()
	}
}

// goOn reads the answer of a call that goes on after its caller was
// answered 504 (timedRoundTrip) to its end, for its usage, and then ends
// the call.
func (t *keyTransport) goOn(req, out *http.Request, c *Call, cancel context.CancelCauseFunc, done <-chan roundTripped) {
	defer recoverLate(t.logger)
	defer c.end() // settled with what is known, even if reading it panicked
	r := <-done
	if res, err := t.answer(req, out, c, cancel, r.res, r.err); err == nil {
		res.Body.Close() // a stream's or a long answer's rest is read for its usage
	}
}

// recoverLate logs a panic of a call's own goroutine, as net/http does
// for a handler's: the goroutine is a request's.
func recoverLate(logger *zap.Logger) {
	if v := recover(); v != nil {
		logger.Error("panic in a call that went on after its caller was answered", zap.Any("panic", v), zap.Stack("stack"))
	}
}

// idleStream is a stream's upstream body that falls silent for longer
// than timeout, while its caller waits: its Read then returns errIdle,
// which ends the caller's stream with an error event, and its call goes
// on (answerNow), read on from where it stood (readOn) to its usage.
// So the body is read by a goroutine of its own (pump), a read ahead of
// the proxy, which a silent read may outlast. The silence is the time
// the pump has waited on the upstream: a client that reads slowly holds
// the pump back from reading, and that is not the upstream's silence. It
// is looked at when the clock runs out, so that a read costs no timer.
// A call whose caller left is cut at the silence instead, as idleBody
// cuts one.
type idleStream struct {
	src     io.ReadCloser
	c       *Call
	caller  context.Context // the caller's request, for the stream read on
	limit   int64           // the answers' budget, for the stream read on
	timeout time.Duration
	clock   *time.Timer
	start   time.Time
	waiting atomic.Int64  // since when the pump waits on a read, from start, plus one; 0: it does not
	read    chan pumped   // what the pump read, in order
	free    chan []byte   // the buffers it may read into
	held    []byte        // the buffer of the pump's that Read holds
	rest    []byte        // of it, not yet returned
	err     error         // the body's end, once read
	stop    chan struct{} // closed when the body is: the pump ends
	closed  sync.Once
}

type pumped struct {
	buf []byte
	err error
}

// pumpBuffer is the size of each of an idleStream's two buffers, counted
// in the answers' memory (wire.Take) while the stream is open.
const pumpBuffer = 4 << 10

func newIdleStream(caller context.Context, src io.ReadCloser, c *Call, timeout time.Duration, limit int64) *idleStream {
	s := &idleStream{src: src, c: c, caller: caller, limit: limit, timeout: timeout,
		clock: time.NewTimer(timeout), start: time.Now(),
		read: make(chan pumped, 1), free: make(chan []byte, 2), stop: make(chan struct{})}
	buf := make([]byte, 2*pumpBuffer)
	s.free <- buf[:pumpBuffer:pumpBuffer]
	s.free <- buf[pumpBuffer:]
	wire.Take(2 * pumpBuffer)
	go s.pump()
	return s
}

// pump reads the body ahead of Read, until its end or its closing.
func (s *idleStream) pump() {
	for {
		var buf []byte
		select {
		case buf = <-s.free:
		case <-s.stop:
			return
		}
		s.waiting.Store(int64(time.Since(s.start)) + 1)
		n, err := s.src.Read(buf)
		s.waiting.Store(0)
		select {
		case s.read <- pumped{buf[:n], err}:
		case <-s.stop:
			return
		}
		if err != nil {
			return
		}
	}
}

func (s *idleStream) Read(p []byte) (int, error) {
	for len(s.rest) == 0 {
		if s.err != nil {
			return 0, s.err
		}
		if s.held != nil {
			s.free <- s.held[:cap(s.held)]
			s.held = nil
		}
		r, ok := s.next()
		if !ok {
			return 0, errIdle
		}
		s.held, s.rest, s.err = r.buf, r.buf, r.err
	}
	n := copy(p, s.rest)
	s.rest = s.rest[n:]
	return n, nil
}

// next waits for what the pump reads next: ok is false when the body
// fell silent for timeout while its caller waited, and its call goes on.
func (s *idleStream) next() (r pumped, ok bool) {
	if s.c.GoesOn() { // its caller was answered: the silence no longer counts
		return <-s.read, true
	}
	for {
		select {
		case r = <-s.read:
			return r, true
		case <-s.clock.C:
		}
		since := s.waiting.Load()
		if since == 0 { // the pump waits for the reader, not the upstream
			s.clock.Reset(s.timeout)
			continue
		}
		if silent := time.Since(s.start) - time.Duration(since-1); silent < s.timeout {
			s.clock.Reset(s.timeout - silent)
			continue
		}
		break
	}
	switch goesOn, waiting := s.c.answerNow(errIdle, s.c.Usage.Status); {
	case goesOn:
		go s.readOn(s.c.logger)
		return pumped{}, false
	case !waiting:
		s.c.cut(errIdle) // its caller left: cut at the silence
	}
	// Cut: the read ends with the request.
	r = <-s.read
	if r.err != nil {
		r.err = errIdle
	}
	return r, true
}

// Close closes the body, unless its call goes on: readOn owns it then.
func (s *idleStream) Close() error {
	if s.c.GoesOn() {
		return nil
	}
	return s.closeNow()
}

func (s *idleStream) closeNow() error {
	err := s.src.Close() // ends a read in progress
	s.closed.Do(func() {
		close(s.stop)
		s.clock.Stop()
		wire.Release(2 * pumpBuffer)
	})
	return err
}

// readOn reads a stream that went on after its caller had its end
// (idleStream) from where it stood, for its usage, and then ends the
// call. The event the silence tore, if any, lost its start with the
// caller's stream: the rest of it counts for nothing.
func (s *idleStream) readOn(logger *zap.Logger) {
	defer recoverLate(logger)
	defer s.c.end() // settled with what is known, even if reading it panicked
	defer s.closeNow()
	rest := wire.NewSSE(s.caller, io.NopCloser(s), (*callTap)(s.c), s.limit) // closed by closeNow
	defer rest.Close()
	rest.Drain()
}
