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
