package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// sentStream is the call of a stream that the upstream received and
// answers, whose caller's request is caller, under a policy that lets
// room calls go on detached; it returns the call and its upstream
// request's context.
func sentStream(caller context.Context, room int64) (*Call, context.Context) {
	c := &Call{Caller: "key_a", logger: zap.NewNop()}
	c.Usage.Watch(caller)
	ctx := c.upstreamContext(caller, context.Background(), &DetachPolicy{Max: room, Timeout: time.Minute})
	c.Usage.MarkSent(true)
	c.Usage.Status, c.Usage.Stream = 200, true
	return c, ctx
}

// TestIdleStreamGoesOnPastASilence: a stream silent past its timeout
// while its caller waits ends for the caller (errIdle), and its call goes
// on: what comes after is read for its usage, the call is settled once
// at its end, and nothing of it outlives the body.
func TestIdleStreamGoesOnPastASilence(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	held := wire.Held()
	src, upstream := io.Pipe()
	caller, leave := context.WithCancel(context.Background())
	defer leave()
	c, _ := sentStream(caller, 1)
	s := newIdleStream(caller, src, c, 20*time.Millisecond, 1<<20)

	if n, err := s.Read(make([]byte, 64)); n != 0 || !errors.Is(err, errIdle) {
		t.Fatalf("read %d, %v at the silence; want errIdle", n, err)
	}
	if !c.GoesOn() || c.AnsweredWith() != 200 {
		t.Fatalf("goes on %v, answered with %d; want it going on, its caller answered 200", c.GoesOn(), c.AnsweredWith())
	}
	if err := s.Close(); err != nil { // as the proxy closes the caller's stream
		t.Fatal(err)
	}
	leave() // the handler returned
	settled := make(chan int, 2)
	c.WhenOver(func() { settled <- 1 })

	go func() { // a pipe's write waits for its read
		_, _ = io.WriteString(upstream, "data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n")
		_, _ = io.WriteString(upstream, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n")
		_, _ = io.WriteString(upstream, "data: [DONE]\n\n")
		upstream.Close()
	}()
	select {
	case <-settled:
	case <-time.After(5 * time.Second):
		t.Fatal("the call that went on was not settled at its end")
	}
	if !c.Usage.Reported || c.Usage.PromptTokens != 7 || c.Usage.CompletionTokens != 3 || c.Usage.Chunks == 0 {
		t.Errorf("usage %+v, want what came after the silence: 7 and 3 reported, output counted", c.Usage)
	}
	if c.Usage.LeftUnread() {
		t.Error("a call read to its end counts as left unread")
	}
	if len(settled) != 0 {
		t.Error("settled twice")
	}
	if now := wire.Held(); now != held {
		t.Errorf("the answers hold %d bytes once the call ended, want %d as before", now, held)
	}
}

// TestIdleStreamWithNoRoomIsCut: with no detached call free, the stream
// is cut at the silence: the upstream request ends, and the call counts
// as left unread (charged the bound).
func TestIdleStreamWithNoRoomIsCut(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	src, upstream := io.Pipe()
	defer upstream.Close()
	caller, leave := context.WithCancel(context.Background())
	defer leave()
	c, ctx := sentStream(caller, 0)
	// The transport ends the body's read when the request ends.
	stop := context.AfterFunc(ctx, func() { upstream.CloseWithError(context.Canceled) })
	defer stop()
	s := newIdleStream(caller, src, c, 20*time.Millisecond, 1<<20)
	if _, err := s.Read(make([]byte, 64)); !errors.Is(err, errIdle) {
		t.Fatalf("read error %v at the silence; want errIdle", err)
	}
	if c.GoesOn() || ctx.Err() == nil || !c.Usage.LeftUnread() {
		t.Errorf("goes on %v, request ended %v, left unread %v; want it cut", c.GoesOn(), ctx.Err() != nil, c.Usage.LeftUnread())
	}
	s.Close()
	c.finish()
}

// TestIdleStreamSlowReaderIsNoSilence: a caller that reads slowly holds
// the pump back; its waits are not the upstream's silence.
func TestIdleStreamSlowReaderIsNoSilence(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	caller, leave := context.WithCancel(context.Background())
	defer leave()
	c, _ := sentStream(caller, 1)
	events := make([][]byte, 8)
	for i := range events {
		events[i] = []byte("data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n")
	}
	s := newIdleStream(caller, io.NopCloser(&eventReader{events: events}), c, 20*time.Millisecond, 1<<20)
	buf := make([]byte, 256)
	for i := 0; ; i++ {
		_, err := s.Read(buf)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read %d: %v", i, err)
		}
		time.Sleep(30 * time.Millisecond) // past the timeout, as a slow client
	}
	if c.GoesOn() || c.Usage.AnsweredEarly() {
		t.Error("a slow reader was taken for the upstream's silence")
	}
	s.Close()
	c.finish()
}

type panicTransport struct{}

func (panicTransport) RoundTrip(*http.Request) (*http.Response, error) { panic("a bug below") }

// TestTimedRoundTripPanicIsAnError: with header_timeout set, the round
// trip runs on a goroutine of its own; a panic there is the request's
// error, as net/http makes one in a handler, not the process's end or a
// handler waiting for ever.
func TestTimedRoundTripPanicIsAnError(t *testing.T) {
	tr := &keyTransport{next: panicTransport{}, host: "api.example.com", pool: testPool(zap.NewNop(), ServerKey{Key: "sk-a"}),
		headerTimeout: time.Minute, logger: zap.NewNop()}
	req, _ := http.NewRequest(http.MethodGet, "http://api.example.com/v1/models", nil)
	if res, err := tr.RoundTrip(req); err == nil || !strings.Contains(err.Error(), "panic") {
		t.Fatalf("got %v, %v; want the panic as an error", res, err)
	}
}

// A round trip that panicked mid-attempt left its clock running; the
// clock goes back to the pool stopped, or the next request's handler
// would take its tick for its own header_timeout.
func TestTimedTripGoesBackStopped(t *testing.T) {
	tr := &keyTransport{next: panicTransport{}, host: "api.example.com", pool: testPool(zap.NewNop(), ServerKey{Key: "sk-a"}),
		headerTimeout: time.Minute, logger: zap.NewNop()}
	req, _ := http.NewRequest(http.MethodGet, "http://api.example.com/v1/models", nil)
	for range 20 {
		if _, err := tr.RoundTrip(req); err == nil {
			t.Fatal("a panic was no error")
		}
		trip := timedTrips.Get().(*timedTrip)
		if trip.clock.timer.Stop() {
			t.Fatal("a timed trip went back to the pool with its clock running")
		}
		timedTrips.Put(trip)
	}
}
