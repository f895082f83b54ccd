package limiter

import (
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// TestHeartbeatCountsTheFleet: how many instances share the limits while
// Redis fails. An instance alone counts itself at once; one of two waits
// until the other has counted it. Both forgotten (Redis was away longer
// than the notes live), the first back must not count itself alone: a
// Redis that failed again then would leave it the whole limits as its
// share. It keeps the count it had until the other beats again.
func TestHeartbeatCountsTheFleet(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	// Instances of their own, without the background heartbeats: the
	// test beats for them.
	instance := func(id string) *Redis { return &Redis{client: c, prefix: "hb:", instanceID: id, timeout: time.Second} }
	const live = 300 * time.Millisecond
	beat := func(r *Redis) {
		time.Sleep(5 * time.Millisecond) // beats in the same millisecond tell no order
		r.heartbeat(live)
	}
	a, b := instance("a"), instance("b")
	beat(a)
	if n := a.Instances(); n != 1 {
		t.Fatalf("a alone: %d instances, want 1", n)
	}
	beat(b)
	if n := b.Instances(); n != 0 {
		t.Errorf("b, before a counted it: %d instances, want 0 (not yet counted)", n)
	}
	beat(a)
	beat(b)
	if na, nb := a.Instances(), b.Instances(); na != 2 || nb != 2 {
		t.Fatalf("both beaten twice: a counts %d, b %d; want 2", na, nb)
	}

	time.Sleep(2 * live) // both forgotten, as by a Redis away that long
	beat(a)
	if n := a.Instances(); n != 2 {
		t.Errorf("a back first, b not yet: %d instances, want the 2 it had, not itself alone", n)
	}
	beat(b)
	beat(a)
	if n := a.Instances(); n != 2 {
		t.Errorf("both back: a counts %d, want 2", n)
	}

	time.Sleep(2 * live) // both forgotten; b does not come back
	beat(a)
	beat(a)
	if n := a.Instances(); n != 1 {
		t.Errorf("a back, b gone: %d instances once a beat again, want 1", n)
	}
}
