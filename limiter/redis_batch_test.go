package limiter

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// TestRedisDeferredSettleComesFirst checks the order of the queue: a
// deferred settle counts before the instance's next call, so that a
// caller's next request never finds its last one in flight.
func TestRedisDeferredSettleComesFirst(t *testing.T) {
	s := redistest.Start(t)
	r := newTestRedis(t, newRedisClient(t, s), "order:")
	lim := &Limits{Concurrent: 1, Tokens: Rate{N: 10_000, Window: time.Hour}}
	ctx := t.Context()
	for i := range 200 {
		d, err := r.Admit(ctx, "c", lim, 10, time.Now())
		if err != nil || d.Reason != Admitted {
			t.Fatalf("request %d: %v %v, want admitted: its last settle comes before it", i, d.Reason, err)
		}
		r.SettleDeferred("c", lim, d.Lease, 5, time.Now())
	}
	st, err := r.State(ctx, "c", lim, time.Now())
	if err != nil || st.InFlight != 0 {
		t.Fatalf("state after 200 deferred settles: %+v %v, want nothing in flight", st, err)
	}
	// 200 × 5 used: the refunds of 200 × 5 landed, each once.
	if got, want := st.TokensRemaining, int64(10_000-200*5); got < want || got > want+5 {
		t.Errorf("tokens remaining: %d, want about %d (every settle applied once)", got, want)
	}
}

// TestRedisCloseSendsDeferredSettles checks that Close sends what is
// queued: a config reload or a shutdown loses no settle.
func TestRedisCloseSendsDeferredSettles(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	r := newRedis(c, "close:", zap.NewNop(), testTimeout, LeaseTTL, keepEnded)
	t.Cleanup(r.Close) // a repeat changes nothing
	lim := &Limits{Concurrent: 1000}
	ctx := t.Context()
	var leases []Lease
	for i := range 100 {
		d, err := r.Admit(ctx, "c"+strconv.Itoa(i%3), lim, 0, time.Now())
		if err != nil || d.Reason != Admitted {
			t.Fatalf("admit: %v %v", d.Reason, err)
		}
		leases = append(leases, d.Lease)
	}
	for i, l := range leases {
		r.SettleDeferred("c"+strconv.Itoa(i%3), lim, l, 0, time.Now())
	}
	r.Close()
	check := newTestRedis(t, c, "close:")
	for i := range 3 {
		if st, err := check.State(ctx, "c"+strconv.Itoa(i), lim, time.Now()); err != nil || st.InFlight != 0 {
			t.Errorf("client c%d after Close: %+v %v, want nothing in flight", i, st, err)
		}
	}
	// A settle after Close is tried at once.
	d, err := check.Admit(ctx, "late", lim, 0, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	r.SettleDeferred("late", lim, d.Lease, 0, time.Now())
	if st, err := check.State(ctx, "late", lim, time.Now()); err != nil || st.InFlight != 0 {
		t.Errorf("a settle after Close: %+v %v, want nothing in flight", st, err)
	}
	if _, err := r.Admit(ctx, "c0", lim, 0, time.Now()); !errors.Is(err, errClosed) {
		t.Errorf("admit after Close: %v, want %v", err, errClosed)
	}
}

// TestRedisQueueIsBounded checks a Redis that stops answering: the calls
// queued behind a pipeline that waits are bounded, for each client and
// for each queue. A call past its client's share fails at once, while
// another client's call of the same queue still waits for Redis' answer,
// so that one client's burst does not decide the others'; a call past the
// queue's bound fails at once whoever makes it; a deferred settle past
// either goes to the retries; and every settle lands once Redis answers
// again.
func TestRedisQueueIsBounded(t *testing.T) {
	s := redistest.Start(t)
	// A pipeline of deferred settles alone waits a third of the lease
	// TTL.
	r := newShortRedis(t, newRedisClient(t, s), "bounded:", 3*time.Second, keepEnded)
	lim := &Limits{Concurrent: maxPerQueue + 100, Tokens: Rate{N: 1 << 40, Window: time.Hour}}
	ctx := t.Context()
	clients := sameQueue(r, 7)
	burst, other, last := clients[0], clients[1], clients[6]
	leases := make(map[string][]Lease)
	for _, c := range clients {
		for range 10 {
			d, err := r.Admit(ctx, c, lim, 10, time.Now())
			if err != nil || d.Reason != Admitted {
				t.Fatalf("admit: %v %v", d.Reason, err)
			}
			leases[c] = append(leases[c], d.Lease)
		}
	}
	settle := func(c string, n int) {
		for i := range n {
			r.SettleDeferred(c, lim, leases[c][1+i%8], 0, time.Now())
		}
	}
	s.Pause(t)
	paused := true
	defer func() {
		if paused {
			s.Resume(t)
		}
	}()
	// One to be on its way, then the burst's share of the queue behind it.
	r.SettleDeferred(burst, lim, leases[burst][0], 0, time.Now())
	time.Sleep(50 * time.Millisecond)
	settle(burst, maxPerClient)
	refusedAtOnce := func(c, when string) {
		t.Helper()
		start := time.Now()
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if _, err := r.Admit(actx, c, lim, 0, time.Now()); !errors.Is(err, errQueueFull) {
			t.Errorf("admit %s: %v, want %v", when, err, errQueueFull)
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("admit %s took %v, want an answer at once", when, took)
		}
	}
	refusedAtOnce(burst, "past its client's share")
	type answer struct {
		d   Decision
		err error
	}
	answered := make(chan answer, 1)
	go func() {
		d, err := r.Admit(ctx, other, lim, 0, time.Now())
		answered <- answer{d, err}
	}()
	time.Sleep(50 * time.Millisecond) // queued

	// Four more clients fill the queue; a client with none queued is
	// then refused too.
	for _, c := range clients[2:6] {
		settle(c, maxPerClient)
	}
	refusedAtOnce(last, "with the queue full")
	retried := r.retries.len()
	r.SettleDeferred(last, lim, leases[last][9], 0, time.Now())
	if n := r.retries.len(); n != retried+1 {
		t.Errorf("a settle past the bound: %d calls wait for a retry, want %d", n, retried+1)
	}
	select {
	case a := <-answered:
		t.Fatalf("another client's call beside the burst answered while Redis is paused: %+v %v", a.d, a.err)
	default:
	}
	s.Resume(t)
	paused = false
	a := <-answered
	if a.err != nil || a.d.Reason != Admitted {
		t.Fatalf("another client's call beside the burst: %+v %v, want admitted by Redis", a.d, a.err)
	}
	r.SettleDeferred(other, lim, a.d.Lease, 0, time.Now())
	for _, c := range clients {
		for _, l := range leases[c] {
			r.SettleDeferred(c, lim, l, 0, time.Now())
		}
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var open []string
		for _, c := range clients {
			if st, err := r.State(ctx, c, lim, time.Now()); err != nil || st.InFlight != 0 || st.TokensRemaining != 1<<40 {
				open = append(open, fmt.Sprintf("%s: %+v %v", c, st, err))
			}
		}
		if len(open) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not every settle landed within 5 s of Redis answering again: %v", open)
		}
	}
}

// sameQueue returns n clients whose calls go through one queue of r.
func sameQueue(r *Redis, n int) []string {
	var clients []string
	for i := 0; len(clients) < n; i++ {
		c := "c" + strconv.Itoa(i)
		if len(clients) == 0 || r.queueOf(r.keys(c)) == r.queueOf(r.keys(clients[0])) {
			clients = append(clients, c)
		}
	}
	return clients
}

// TestRedisConcurrentCallsShareAPipeline checks that concurrent calls are
// answered right when they go in one pipeline: each gets its own answer.
func TestRedisConcurrentCallsShareAPipeline(t *testing.T) {
	s := redistest.Start(t)
	r := newTestRedis(t, newRedisClient(t, s), "shared:")
	ctx := t.Context()
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			client := "c" + strconv.Itoa(g)
			// Each client's own burst: 10 of 15 admitted, whatever the
			// others do.
			lim := &Limits{Requests: Rate{N: 10, Window: time.Hour}}
			admitted := 0
			for range 15 {
				d, err := r.Admit(ctx, client, lim, 0, time.Now())
				if err != nil {
					t.Error(err)
					return
				}
				if d.Reason == Admitted {
					admitted++
					if d.RequestsRemaining != int64(10-admitted) {
						t.Errorf("%s: %d requests remaining after %d, want %d", client, d.RequestsRemaining, admitted, 10-admitted)
					}
					r.SettleDeferred(client, lim, d.Lease, 0, time.Now())
				}
			}
			if admitted != 10 {
				t.Errorf("%s: %d admitted of 15, want 10", client, admitted)
			}
		})
	}
	wg.Wait()
}
