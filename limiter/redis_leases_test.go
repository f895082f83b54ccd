package limiter

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// settledWithin fails unless the client's standing reaches want within
// three seconds (a few retry rounds), and stays there one more round.
func settledWithin(t *testing.T, r *Redis, lim *Limits, want func(State) bool, what string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		st, err := r.State(t.Context(), "c", lim, time.Now())
		if err == nil && want(st) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 3 s: %+v %v", what, st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(1200 * time.Millisecond)
	if st, err := r.State(t.Context(), "c", lim, time.Now()); err != nil || !want(st) {
		t.Errorf("%s, one round later: %+v %v", what, st, err)
	}
}

func TestRedisLongRequestKeepsItsSlot(t *testing.T) {
	s := redistest.Start(t)
	// Renewed every 100 ms: the request runs for five TTLs.
	r := newShortRedis(t, newRedisClient(t, s), "long:", 300*time.Millisecond, keepEnded)
	ctx := t.Context()
	lim := &Limits{Concurrent: 1}
	d, err := r.Admit(ctx, "c", lim, 0, time.Now())
	if err != nil || d.Reason != Admitted {
		t.Fatalf("admit: %+v %v", d, err)
	}
	time.Sleep(1500 * time.Millisecond)
	if st, _ := r.State(ctx, "c", lim, time.Now()); st.InFlight != 1 {
		t.Errorf("a request running for five lease TTLs: %d in flight, want 1", st.InFlight)
	}
	if d, _ := r.Admit(ctx, "c", lim, 0, time.Now()); d.Reason != ConcurrencyLimit {
		t.Errorf("a second request beside it: %v, want refused for concurrency", d.Reason)
	}
	if err := r.Settle(ctx, "c", lim, d.Lease, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	// The renewals of a settled lease stop, and a late one does not bring
	// it back.
	time.Sleep(400 * time.Millisecond)
	if st, _ := r.State(ctx, "c", lim, time.Now()); st.InFlight != 0 {
		t.Errorf("after its settle: %d in flight, want 0", st.InFlight)
	}
	if n := len(r.running.byClient()); n != 0 {
		t.Errorf("%d clients with leases to renew after the settle, want 0", n)
	}
}

func TestRedisRenewalRestoresALostLease(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	r := newShortRedis(t, c, "lost:", 300*time.Millisecond, keepEnded)
	lim := &Limits{Concurrent: 1}
	if d, err := r.Admit(t.Context(), "c", lim, 0, time.Now()); err != nil || d.Reason != Admitted {
		t.Fatalf("admit: %+v %v", d, err)
	}
	// Redis lost its data (a restart without persistence): the running
	// request is counted again by its next renewal.
	c.FlushAll(t.Context())
	settledWithin(t, r, lim, func(st State) bool { return st.InFlight == 1 }, "the lost lease is renewed")
}

// TestRedisStallKeepsRunningSlots: Redis stalls for longer than a lease
// lives (as a long fork, a slow script or DEBUG SLEEP would), while
// instance A runs a request of a caller on concurrent 1. Nothing ends
// that request: A renews its lease once Redis answers again. Redis' clock
// moved on meanwhile, past the lease no instance could renew; yet neither
// an admission instance B sent during the stall, decided as Redis wakes,
// nor one B sends as it wakes, takes that request's slot.
func TestRedisStallKeepsRunningSlots(t *testing.T) {
	s := redistest.Start(t)
	const ttl = 600 * time.Millisecond // LeaseTTL, scaled down
	a := newShortRedis(t, newRedisClient(t, s), "stall:", ttl, keepEnded)
	b := newShortRedis(t, newRedisClient(t, s), "stall:", ttl, keepEnded)
	lim := &Limits{Concurrent: 1}
	warm(t, b, lim)
	running, err := a.Admit(t.Context(), "c", lim, 0, time.Now())
	if err != nil || running.Reason != Admitted {
		t.Fatalf("A's request: %+v %v", running, err)
	}

	s.Pause(t)
	var during Decision
	var duringErr error
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		time.Sleep(100 * time.Millisecond)
		// It waits for Redis' answer up to the timeout: it is sent now,
		// and decided as Redis wakes.
		during, duringErr = b.Admit(context.Background(), "c", lim, 0, time.Now())
	}()
	time.Sleep(2 * ttl)
	s.Resume(t)
	<-sent
	if !errors.Is(duringErr, errWoke) {
		t.Errorf("B's request sent during the stall, beside A's running one on concurrent 1: %+v %v, want it undone (errWoke)", during, duringErr)
	}
	if d, err := b.Admit(t.Context(), "c", lim, 0, time.Now()); err != nil || d.Reason != ConcurrencyLimit {
		t.Errorf("B's request as Redis woke: %+v %v, want refused for concurrency", d, err)
	}
	settledWithin(t, a, lim, func(st State) bool { return st.InFlight == 1 }, "A's request alone in flight once A renewed")
	if err := a.Settle(t.Context(), "c", lim, running.Lease, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	if d, err := b.Admit(t.Context(), "c", lim, 0, time.Now()); err != nil || d.Reason != Admitted {
		t.Errorf("B's request once A's ended: %+v %v, want admitted", d, err)
	}
}

// TestLeaseGrace: an admission counts the leases that expired while Redis
// was silent long enough (two thirds of LeaseTTL) for a renewed lease to
// expire, during that silence and for a renewal period and a second
// after it; never otherwise.
func TestLeaseGrace(t *testing.T) {
	r := &Redis{leaseTTL: LeaseTTL}
	t0 := time.Now()
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	if g := r.leaseGrace(t0); g != 0 {
		t.Errorf("before any answer: %v, want none", g)
	}
	r.noteAnswer(t0)
	for _, tc := range []struct {
		at   time.Duration
		want time.Duration
	}{
		{time.Second, 0},
		{10 * time.Second, 0},
		{11 * time.Second, 12 * time.Second}, // silent for longer than a lease can outlive its last renewal
	} {
		if g := r.leaseGrace(at(tc.at)); g != tc.want {
			t.Errorf("silent for %v: %v, want %v", tc.at, g, tc.want)
		}
	}
	r.noteAnswer(at(20 * time.Second))
	if !r.wokeSince(at(19*time.Second)) || r.wokeSince(at(21*time.Second)) {
		t.Error("woke: not after a call sent during the silence, or after one sent after it")
	}
	for _, tc := range []struct {
		at   time.Duration
		want time.Duration
	}{
		{21 * time.Second, 21 * time.Second}, // the 20 s silence, and a second
		{25900 * time.Millisecond, 21 * time.Second},
		{26100 * time.Millisecond, 0}, // past a renewal period and a second
	} {
		if g := r.leaseGrace(at(tc.at)); g != tc.want {
			t.Errorf("%v after the last answer before the silence: %v, want %v", tc.at, g, tc.want)
		}
	}
	r.noteAnswer(at(27 * time.Second))
	if g := r.leaseGrace(at(28 * time.Second)); g != 0 {
		t.Errorf("answered a second before: %v, want none", g)
	}
}

// warm loads the scripts into Redis and opens a connection, so that a
// call sent to a stopped Redis runs when it goes on, as in a running
// fleet, rather than failing for want of its script.
func warm(t *testing.T, r *Redis, lim *Limits) {
	t.Helper()
	d, err := r.Admit(t.Context(), "warm", lim, 0, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Settle(t.Context(), "warm", lim, d.Lease, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
}

// refusing is a go-redis limiter that fails every command while on, as
// a Redis that cannot be reached does: the command never leaves.
type refusing struct{ on atomic.Bool }

func (l *refusing) Allow() error {
	if l.on.Load() {
		return errors.New("unreachable")
	}
	return nil
}
func (*refusing) ReportResult(error) {}

// refusingClient is a client on s whose commands fail while off is on.
func refusingClient(t *testing.T, s *redistest.Server) (c *redis.Client, off *refusing) {
	off = new(refusing)
	c = redis.NewClient(&redis.Options{Addr: s.Addr, ContextTimeoutEnabled: true, Limiter: off})
	t.Cleanup(func() { c.Close() })
	return c, off
}

func TestRedisFailedSettleIsRetried(t *testing.T) {
	s := redistest.Start(t)
	lim := &Limits{Concurrent: 1, Tokens: Rate{N: 1000, Window: 1000 * time.Hour}, Quota: Quota{N: 5000, Period: Day}}
	settled := func(st State) bool { return st.InFlight == 0 && st.QuotaUsed == 100 && st.TokensRemaining == 900 }

	t.Run("its answer was lost", func(t *testing.T) {
		r := newTestRedis(t, newRedisClient(t, s), "lost-answer:")
		warm(t, r, lim)
		d, _ := r.Admit(t.Context(), "c", lim, 500, time.Now())
		// Stopped, Redis runs the settle when it goes on, after the
		// instance gave up waiting; the retry then changes nothing.
		s.Pause(t)
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		err := r.Settle(ctx, "c", lim, d.Lease, 100, time.Now())
		cancel()
		s.Resume(t)
		if err == nil {
			t.Fatal("settle with Redis stopped: no error")
		}
		settledWithin(t, r, lim, settled, "settled once")
	})

	t.Run("it never left", func(t *testing.T) {
		c, off := refusingClient(t, s)
		r := newTestRedis(t, c, "never-left:")
		d, _ := r.Admit(t.Context(), "c", lim, 500, time.Now())
		off.on.Store(true)
		if err := r.Settle(t.Context(), "c", lim, d.Lease, 100, time.Now()); err == nil {
			t.Fatal("settle with Redis unreachable: no error")
		}
		time.Sleep(1200 * time.Millisecond) // a retry round fails too
		off.on.Store(false)
		settledWithin(t, r, lim, settled, "settled by a retry")
	})

	t.Run("Redis refuses it", func(t *testing.T) {
		c, off := refusingClient(t, s)
		r := newTestRedis(t, c, "refused:")
		d, _ := r.Admit(t.Context(), "c", lim, 500, time.Now())
		off.on.Store(true)
		r.Settle(t.Context(), "c", lim, d.Lease, 100, time.Now())
		off.on.Store(false)
		// A lease set of the wrong type: the script fails each time.
		c.Set(t.Context(), "refused:lease:{c}", "x", 0)
		for deadline := time.Now().Add(3 * time.Second); r.retries.len() != 0; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("a settle Redis refuses is still retried after 3 s")
			}
		}
	})

	t.Run("a late repeat never refunds", func(t *testing.T) {
		c := newRedisClient(t, s)
		r := newTestRedis(t, c, "late-repeat:")
		d, _ := r.Admit(t.Context(), "c", lim, 500, time.Now())
		if err := r.Settle(t.Context(), "c", lim, d.Lease, 100, time.Now()); err != nil {
			t.Fatal(err)
		}
		// The note of the settle is gone (kept for keepEnded), and a retry
		// unsure whether its first attempt landed comes: it must not refund
		// the reservation a second time.
		c.ZRem(t.Context(), "late-repeat:lease:{c}", d.Lease.ID)
		if err := settleScript.Run(t.Context(), c, r.keys("c"), r.settleArgs(lim, d.Lease, 100-500, 0, true)...).Err(); err != nil {
			t.Fatal(err)
		}
		if st, _ := r.State(t.Context(), "c", lim, time.Now()); st.QuotaUsed != 100 || st.TokensRemaining != 900 {
			t.Errorf("after a late repeat: %+v, want quota 100 and 900 tokens left", st)
		}
	})
}

func TestRedisTimedOutAdmitIsCancelled(t *testing.T) {
	s := redistest.Start(t)
	lim := &Limits{Concurrent: 1, Requests: Rate{N: 100, Window: time.Hour}}

	t.Run("it ran late", func(t *testing.T) {
		r := newTestRedis(t, newRedisClient(t, s), "late-admit:")
		warm(t, r, lim)
		s.Pause(t)
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		_, err := r.Admit(ctx, "c", lim, 0, time.Now())
		cancel()
		s.Resume(t)
		if err == nil {
			t.Fatal("admit with Redis stopped: no error")
		}
		// The admission ran once Redis went on, or never will: either way
		// its slot is free. The request stays counted: its instance served
		// it without Redis.
		settledWithin(t, r, lim, func(st State) bool { return st.InFlight == 0 }, "the slot is free")
		if d, _ := r.Admit(t.Context(), "c", lim, 0, time.Now()); d.Reason != Admitted {
			t.Errorf("the next request: %v, want admitted", d.Reason)
		}
	})

	t.Run("it runs after its cancellation", func(t *testing.T) {
		c := newRedisClient(t, s)
		r := newTestRedis(t, c, "cancelled-first:")
		r.cancelLater("c", lim, "42")
		settledWithin(t, r, lim, func(State) bool { return r.retries.len() == 0 }, "the cancellation lands")
		args := limitArgs(nil, lim)
		args = append(args, 0, r.leaseTTL.Milliseconds(), "42", 0)
		vals, err := admitScript.Run(t.Context(), c, r.keys("c"), args...).Slice()
		if err != nil || len(vals) != 1 || vals[0] != int64(-1) {
			t.Errorf("an admission cancelled before it ran: %v %v, want [-1]", vals, err)
		}
		if st, _ := r.State(t.Context(), "c", lim, time.Now()); st.InFlight != 0 || st.RequestsRemaining != 100 {
			t.Errorf("after it: %+v, want nothing taken", st)
		}
	})
}

// TestNoSlotIsNeverInFlight: a request that takes no slot (GET /v1/usage)
// admitted at the very moment a caller at its concurrency limit sends
// another leaves that one admitted.
func TestNoSlotIsNeverInFlight(t *testing.T) {
	s := redistest.Start(t)
	for _, tc := range []struct {
		name string
		l    Limiter
	}{
		{"memory", NewMemory(nil, 100)},
		{"redis", newTestRedis(t, newRedisClient(t, s), "noslot:")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := t.Context()
			lim := &Limits{Concurrent: 1, Requests: Rate{N: 100, Window: time.Hour}}
			usage := *lim
			usage.Concurrent, usage.NoSlot = 0, true
			u, err := tc.l.Admit(ctx, "c", &usage, 0, time.Now())
			if err != nil || u.Reason != Admitted || u.InFlight != 0 {
				t.Fatalf("the slotless request: %+v %v, want admitted with none in flight", u, err)
			}
			d, err := tc.l.Admit(ctx, "c", lim, 0, time.Now())
			if err != nil || d.Reason != Admitted || d.InFlight != 1 {
				t.Errorf("a request beside it: %+v %v, want admitted, alone in flight", d, err)
			}
			tc.l.Settle(ctx, "c", &usage, u.Lease, 0, time.Now())
			if st, _ := tc.l.State(ctx, "c", lim, time.Now()); st.InFlight != 1 || st.RequestsRemaining != 98 {
				t.Errorf("after the slotless request's settle: %+v, want 1 in flight and both requests counted", st)
			}
		})
	}
}
