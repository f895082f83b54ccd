package proxy

import (
	"context"
	"errors"
	"testing"
	"time"
)

type detachKey struct{}

// TestWatchIsTheUpstreamContext: the watch is the upstream request's
// context: the caller's values, not its cancellation; a context made under
// it (as the transport makes one) ends when the watch cuts the call, and
// the transport's error is given the watch's cause.
func TestWatchIsTheUpstreamContext(t *testing.T) {
	for _, sent := range []bool{false, true} {
		caller, leave := context.WithCancel(context.WithValue(context.Background(), detachKey{}, "v"))
		c := new(Call)
		p := &DetachPolicy{Max: 0, Timeout: time.Minute}
		ctx := c.upstreamContext(caller, context.Background(), p)
		child, stop := context.WithCancelCause(ctx)
		other, stopOther := context.WithCancel(ctx)
		stopOther() // gives its AfterFunc back
		if ctx.Value(detachKey{}) != "v" || child.Value(detachKey{}) != "v" {
			t.Fatal("the caller's values are not the upstream request's")
		}
		c.Usage.MarkSent(sent)
		leave()
		select {
		case <-child.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("sent %v: the caller left, no detached call is free, and the request goes on", sent)
		}
		if ctx.Err() != context.Canceled || other.Err() != context.Canceled {
			t.Fatalf("sent %v: Err %v, %v", sent, ctx.Err(), other.Err())
		}
		if err := c.watch.causeOf(context.Canceled); err != errCallerLeft {
			t.Fatalf("sent %v: cause %v, want %v", sent, err, errCallerLeft)
		}
		if err := c.watch.causeOf(errIdle); err != errIdle {
			t.Fatalf("an error not of the cancellation is changed to %v", err)
		}
		c.finish()
		stop(nil)
	}
}

// TestWatchEndsWithItsCall: a call that ends with its caller there ends
// its request's context, and a context made under it then, with no cause
// of the watch's; a Done asked for afterwards is closed.
func TestWatchEndsWithItsCall(t *testing.T) {
	c := new(Call)
	ctx := c.upstreamContext(context.Background(), context.Background(), &DetachPolicy{Max: 1, Timeout: time.Minute})
	child, stop := context.WithCancel(ctx)
	defer stop()
	c.finish()
	<-child.Done()
	<-ctx.Done()
	late, stopLate := context.WithCancel(ctx)
	defer stopLate()
	<-late.Done()
	if err := c.watch.causeOf(context.Canceled); !errors.Is(err, context.Canceled) {
		t.Fatalf("cause %v", err)
	}
}

// TestDetachedShareOfACaller: a caller holds at most PerCaller of the
// process's Max detached calls; past its share its own call is refused,
// not counted as a refusal of the process, while another caller still
// finds one; a caller's entry goes once it holds none.
func TestDetachedShareOfACaller(t *testing.T) {
	p := &DetachPolicy{Max: 3, PerCaller: 2, Timeout: time.Minute}
	now0, refused0 := Detached()
	entries0 := detachedBy.Len()
	check := func(what string, got, want bool) {
		t.Helper()
		if got != want {
			t.Errorf("%s: got %v, want %v", what, got, want)
		}
	}
	check("a's first", p.acquire("a"), true)
	check("a's second", p.acquire("a"), true)
	check("a's third, past its share", p.acquire("a"), false)
	check("b's first", p.acquire("b"), true)
	check("c's first, with none of the process free", p.acquire("c"), false)
	if now, refused := Detached(); now-now0 != 3 || refused-refused0 != 1 {
		t.Errorf("%d detached and %d refused by the process, want 3 and 1 (c's)", now-now0, refused-refused0)
	}
	if n := detachedBy.Len() - entries0; n != 2 {
		t.Errorf("%d callers counted, want 2 (a and b)", n)
	}
	p.release("a")
	p.release("a")
	if n := detachedBy.Len() - entries0; n != 1 {
		t.Errorf("%d callers counted once a holds none, want 1", n)
	}
	check("a's, once its calls ended", p.acquire("a"), true)
	p.release("a")
	p.release("b")
	if now, _ := Detached(); now != now0 || detachedBy.Len() != entries0 {
		t.Errorf("%d detached and %d callers counted once all ended, want %d and %d", now, detachedBy.Len(), now0, entries0)
	}
}

// TestCallDetachesWithinItsCallersShare: of two calls of one caller
// whose share is one, the first whose caller leaves goes on detached,
// the second is cut; its count is given back when the first is over.
func TestCallDetachesWithinItsCallersShare(t *testing.T) {
	p := &DetachPolicy{Max: 10, PerCaller: 1, Timeout: time.Minute}
	entries0 := detachedBy.Len()
	// leave has c's caller leave and returns what the watch decided.
	leave := func(c *Call) uint8 {
		t.Helper()
		caller, leave := context.WithCancel(context.Background())
		c.Usage.MarkSent(true)
		c.upstreamContext(caller, context.Background(), p)
		leave()
		for range 500 {
			c.watch.mu.Lock()
			s := c.watch.state
			c.watch.mu.Unlock()
			if s != watching {
				return s
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatal("the call's caller left, and the watch decided nothing")
		return watching
	}
	first, second := &Call{Caller: "key_a"}, &Call{Caller: "key_a"}
	if s := leave(first); s != detached {
		t.Errorf("the first call: state %d, want detached (%d)", s, detached)
	}
	if s := leave(second); s != cutShort {
		t.Errorf("the second call: state %d, want cut (%d)", s, cutShort)
	}
	if err := second.watch.causeOf(context.Canceled); err != errCallerLeft {
		t.Errorf("the cut call's cause %v, want %v", err, errCallerLeft)
	}
	first.finish()
	second.finish()
	if n := detachedBy.Len(); n != entries0 {
		t.Errorf("%d callers counted once its calls are over, want %d", n, entries0)
	}
}

// TestAnswerNow: when header_timeout passes with the caller waiting, a
// request the upstream received goes on detached while there is room,
// and is cut when there is none or it was not sent; one whose caller
// left first is decided already. The charge follows (LeftUnread): the
// upstream's own failure of a call that went on is not a call left
// unread, a cut one is.
func TestAnswerNow(t *testing.T) {
	for _, tc := range []struct {
		name             string
		sent, left       bool
		max              int64
		goesOn, waiting  bool
		unread, detached bool
	}{
		{"sent, room", true, false, 1, true, true, false, true},
		{"sent, no room", true, false, 0, false, true, true, false},
		{"not sent", false, false, 1, false, true, true, false},
		{"the caller left first", true, true, 1, false, false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			caller, leave := context.WithCancel(context.Background())
			defer leave()
			c := &Call{Caller: "key_a"}
			c.Usage.Watch(caller)
			ctx := c.upstreamContext(caller, context.Background(), &DetachPolicy{Max: tc.max, Timeout: time.Minute})
			c.Usage.MarkSent(tc.sent)
			if tc.left {
				leave()
				for decided := false; !decided; time.Sleep(time.Millisecond) { // callerLeft runs on its own goroutine
					c.watch.mu.Lock()
					decided = c.watch.state != watching
					c.watch.mu.Unlock()
				}
			}
			before, _ := Detached()
			goesOn, waiting := c.answerNow(errHeaderTimeout, 0)
			if goesOn != tc.goesOn || waiting != tc.waiting {
				t.Fatalf("goes on %v, waiting %v; want %v, %v", goesOn, waiting, tc.goesOn, tc.waiting)
			}
			if now, _ := Detached(); (now == before+1) != (tc.detached && !tc.left) {
				t.Errorf("detached calls went from %d to %d", before, now)
			}
			if ended := ctx.Err() != nil; ended == tc.detached {
				t.Errorf("the upstream request ended: %v, want %v", ended, !tc.detached)
			}
			leave() // the handler returned: the caller's context ends
			if c.Usage.LeftUnread() != tc.unread {
				t.Errorf("left unread %v, want %v", !tc.unread, tc.unread)
			}
			c.finish()
			if now, _ := Detached(); now != before-btoi(tc.left && tc.detached) {
				t.Errorf("detached calls %d once the call ended, want %d", now, before-btoi(tc.left && tc.detached))
			}
		})
	}
}

func btoi(b bool) int64 {
	if b {
		return 1
	}
	return 0
}
