package limiter

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// flaky is a shared backend that fails while down (ErrDown, as a Redis
// held for down) or late (one late answer) is set.
type flaky struct {
	*Memory
	down, late bool
	instances  int
	calls      int
	charged    map[string][2]int64 // requests, tokens
	// chargeQuota makes Charge count the tokens in the quota.
	chargeQuota bool
}

func (f *flaky) fail() error {
	if f.down {
		return ErrDown
	}
	return context.DeadlineExceeded
}

func (f *flaky) failing() bool { return f.down || f.late }

func (f *flaky) Admit(ctx context.Context, client string, lim *Limits, reserve int64, now time.Time) (Decision, error) {
	f.calls++
	if f.failing() {
		return Decision{}, f.fail()
	}
	d, err := f.Memory.Admit(ctx, client, lim, reserve, now)
	if d.Reason == Admitted {
		d.Lease.ID = "shared"
	}
	return d, err
}

func (f *flaky) Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, now time.Time) (Decision, error) {
	f.calls++
	if f.failing() {
		return Decision{Lease: lease}, f.fail()
	}
	return f.Memory.Reserve(ctx, client, lim, lease, tokens, now)
}

func (f *flaky) State(ctx context.Context, client string, lim *Limits, now time.Time) (State, error) {
	f.calls++
	if f.failing() {
		return State{}, f.fail()
	}
	return f.Memory.State(ctx, client, lim, now)
}

func (f *flaky) SettleDeferred(client string, lim *Limits, lease Lease, used int64, now time.Time) {
	f.Memory.Settle(context.Background(), client, lim, lease, used, now)
}

func (f *flaky) Charge(client string, lim *Limits, requests, tokens int64) {
	if f.chargeQuota {
		q := &Limits{Quota: lim.Quota}
		d, _ := f.Memory.Admit(context.Background(), client, q, 0, t0)
		f.Memory.Settle(context.Background(), client, q, d.Lease, tokens, t0)
	}
	if f.charged == nil {
		f.charged = make(map[string][2]int64)
	}
	c := f.charged[client]
	f.charged[client] = [2]int64{c[0] + requests, c[1] + tokens}
}

func (f *flaky) Answers() bool { return !f.down }

// Instances: 1 by default; a negative instances, 0 (not counted by all).
func (f *flaky) Instances() int {
	if f.instances < 0 {
		return 0
	}
	return max(f.instances, 1)
}

// TestFallback: a late answer is no outage: that call alone is refused,
// unless the policy is UseLocalUnshared. ErrDown puts the fallback in force
// until an answer, and what the local limits admitted is charged to the
// shared backend then.
func TestFallback(t *testing.T) {
	ctx := context.Background()
	lim := &Limits{Requests: Rate{N: 2, Window: time.Hour}}
	for _, tc := range []struct {
		name   string
		policy OnError
	}{{"local", UseLocal}, {"deny", Deny}, {"local_unshared", UseLocalUnshared}} {
		t.Run(tc.name, func(t *testing.T) {
			shared := &flaky{Memory: NewMemory(nil, 100)}
			var changes []bool
			f := newFallback(shared, NewMemory(noFigure{}, 100), tc.policy, zap.NewNop())
			f.OnChange = func(down bool) { changes = append(changes, down) }

			if d, err := f.Admit(ctx, "c", lim, 0, t0); err != nil || d.Lease.ID != "shared" {
				t.Fatalf("up: %+v %v, want the shared backend's decision", d, err)
			}
			shared.late = true
			d, err := f.Admit(ctx, "c", lim, 0, t0)
			if tc.policy == UseLocalUnshared {
				if err != nil || d.Reason != Admitted || d.Lease.ID != "" {
					t.Errorf("late, local_unshared: %+v %v, want a local admission", d, err)
				}
			} else if !errors.Is(err, ErrUnavailable) {
				t.Errorf("late: %+v %v, want ErrUnavailable", d, err)
			}
			if f.Down() || len(changes) != 0 {
				t.Errorf("one late answer: down %v, changes %v; want no fallback in force", f.Down(), changes)
			}
			shared.late, shared.down = false, true
			d, err = f.Admit(ctx, "d", lim, 0, t0)
			if !f.Down() {
				t.Error("ErrDown: the fallback is not in force")
			}
			switch tc.policy {
			case UseLocal:
				// Its share starts empty as the outage does; half an
				// hour refills one request.
				if err != nil || d.Reason != RequestLimit {
					t.Errorf("down, local, at once: %+v %v, want refused by the empty share", d, err)
				}
				if d, err := f.Admit(ctx, "d", lim, 0, t0.Add(30*time.Minute)); err != nil || d.Reason != Admitted || d.Lease.ID != "" {
					t.Errorf("down, local, half an hour later: %+v %v, want a local admission", d, err)
				}
			case Deny:
				if !errors.Is(err, ErrUnavailable) {
					t.Errorf("down, deny: %v, want ErrUnavailable", err)
				}
			case UseLocalUnshared:
				if err != nil || d.Reason != Admitted {
					t.Errorf("down, local_unshared: %+v %v, want a local admission from the whole limits", d, err)
				}
			}
			shared.down = false
			if d, err := f.Admit(ctx, "d", lim, 0, t0); err != nil || d.Lease.ID != "shared" {
				t.Errorf("back up: %+v %v, want the shared backend again", d, err)
			}
			if len(changes) != 2 || !changes[0] || changes[1] {
				t.Errorf("changes %v, want [true false]", changes)
			}
			want := map[string][2]int64{"d": {1, 0}} // the local admissions
			switch tc.policy {
			case Deny:
				want = nil
			case UseLocalUnshared:
				want["c"] = [2]int64{1, 0}
			}
			if len(shared.charged) != len(want) || shared.charged["c"] != want["c"] || shared.charged["d"] != want["d"] {
				t.Errorf("charged %v, want %v", shared.charged, want)
			}
		})
	}
}

// TestFallbackShares: under UseLocal each instance decides with its share
// of what the rates refill during the outage, from empty, whatever the
// shared backend last said was left; a client whose tier has a quota, a
// budget or a concurrency limit is refused, and every client while the
// instance may not be counted by all.
func TestFallbackShares(t *testing.T) {
	ctx := context.Background()
	lim := &Limits{Requests: Rate{N: 10, Window: time.Hour}}
	shared := &flaky{Memory: NewMemory(nil, 100), instances: 2}
	f := newFallback(shared, NewMemory(noFigure{}, 100), UseLocal, zap.NewNop())
	if d, _ := f.Admit(ctx, "c", lim, 0, t0); d.Lease.ID != "shared" {
		t.Fatalf("up: %+v, want the shared backend's admission (9 left)", d)
	}
	shared.down = true
	admitted := func(client string, lim *Limits, now time.Time) (n int) {
		for range 20 {
			if d, err := f.Admit(ctx, client, lim, 0, now); err == nil && d.Reason == Admitted {
				n++
			}
		}
		return n
	}
	if n := admitted("c", lim, t0); n != 0 {
		t.Errorf("down, at once: %d admitted, want none: another instance may have spent the 9 left", n)
	}
	if n := admitted("c", lim, t0.Add(time.Hour)); n != 5 {
		t.Errorf("down, an hour later: %d admitted, want half of the hour's 10 (2 instances)", n)
	}
	if n := admitted("new", lim, t0.Add(3*time.Hour)); n != 5 {
		t.Errorf("down, a client never heard of, 3 hours later: %d admitted, want its share of the burst, 5", n)
	}
	for _, tc := range []struct {
		name string
		lim  *Limits
	}{
		{"a quota", &Limits{Requests: lim.Requests, Quota: Quota{N: 1000, Period: Day}}},
		{"a concurrency limit", &Limits{Requests: lim.Requests, Concurrent: 4}},
		{"a burst of 1", &Limits{Requests: Rate{N: 1, Window: time.Minute}}},
	} {
		if _, err := f.Admit(ctx, "c", tc.lim, 0, t0.Add(time.Hour)); !errors.Is(err, ErrUnavailable) {
			t.Errorf("down, %s: %v, want ErrUnavailable", tc.name, err)
		}
	}
	shared.instances = -1 // not counted by all yet
	if _, err := f.Admit(ctx, "c", lim, 0, t0.Add(5*time.Hour)); !errors.Is(err, ErrUnavailable) {
		t.Errorf("down, the instance not counted by all: %v, want ErrUnavailable", err)
	}
}

// TestFallbackReserve: a shared lease reserves in the local limits when
// the shared backend is down, checked there, and gives back there what it
// did not use when settled; the shared backend is charged all it used.
func TestFallbackReserve(t *testing.T) {
	ctx := t.Context()
	lim := &Limits{Tokens: Rate{N: 1000, Window: time.Hour}}
	t1 := t0.Add(30 * time.Minute) // 500 tokens refilled
	tokensLeft := func(t *testing.T, l Limiter) int64 {
		t.Helper()
		s, err := l.State(ctx, "c", lim, t1)
		if err != nil {
			t.Fatal(err)
		}
		return s.TokensRemaining
	}
	for _, tc := range []struct {
		name   string
		policy OnError
	}{{"local", UseLocal}, {"deny", Deny}} {
		t.Run(tc.name, func(t *testing.T) {
			shared := &flaky{Memory: NewMemory(nil, 100)}
			local := NewMemory(noFigure{}, 100)
			f := newFallback(shared, local, tc.policy, zap.NewNop())

			d, _ := f.Admit(ctx, "c", lim, 0, t0)
			d, err := f.Reserve(ctx, "c", lim, d.Lease, 300, t0)
			lease := d.Lease
			if err != nil || d.Reason != Admitted || lease.Reserved != 300 || lease.ID != "shared" {
				t.Fatalf("up: %+v %v, want 300 reserved", d, err)
			}

			shared.down = true
			d, err = f.Reserve(ctx, "c", lim, lease, 100, t0)
			switch tc.policy {
			case UseLocal:
				if err != nil || d.Reason != TokenLimit || d.Lease != lease {
					t.Errorf("down, local, at once: %+v %v, want refused by the empty share", d, err)
				}
				d, err = f.Reserve(ctx, "c", lim, lease, 100, t1)
				if err != nil || d.Reason != Admitted || d.Lease.Reserved != 400 || d.Lease.Local != 100 || d.TokensRemaining != 400 {
					t.Errorf("down, local, half an hour later: %+v %v, want 100 reserved locally of the 500 refilled", d, err)
				}
				if d, err := f.Reserve(ctx, "c", lim, d.Lease, 401, t1); err != nil || d.Reason != TokenLimit {
					t.Errorf("down, local, 401 more: %+v %v, want refused by the local tokens", d, err)
				}
				lease = d.Lease
			case Deny:
				if !errors.Is(err, ErrUnavailable) || d.Lease != lease {
					t.Errorf("down, deny: %+v %v, want ErrUnavailable and the lease as it was (%+v)", d, err, lease)
				}
			}

			shared.down = false
			if err := f.Settle(ctx, "c", lim, lease, 350, t1); err != nil {
				t.Fatal(err)
			}
			if left := tokensLeft(t, shared); left != 950 {
				t.Errorf("after settling 350: %d tokens left in the shared backend, want 950", left)
			}
			// The share refilled 500, of which the local part took 100
			// and gave back what the request did not use: it used 50
			// past the 300 reserved in the shared backend.
			want := int64(450)
			if tc.policy == Deny {
				want = 1000 // never decided locally
			}
			if left := tokensLeft(t, local); left != want {
				t.Errorf("after settling: %d tokens left locally, want %d", left, want)
			}
		})
	}
	t.Run("negative", func(t *testing.T) {
		f := newFallback(&flaky{Memory: NewMemory(nil, 100), down: true}, NewMemory(nil, 100), UseLocal, zap.NewNop())
		if _, err := f.Reserve(ctx, "c", lim, Lease{ID: "shared"}, -1, t0); err == nil {
			t.Error("reserve -1: no error")
		}
	})
}

// localFallback returns a Redis limiter on s, held for down 50 ms past an
// unanswered call, and a UseLocal Fallback on it, once it counts itself
// the one instance.
func localFallback(t *testing.T, s *redistest.Server, prefix string) (*Redis, *Fallback) {
	r := newTimedRedis(t, newRedisClient(t, s), prefix, 50*time.Millisecond)
	for r.Instances() != 1 {
		time.Sleep(10 * time.Millisecond)
	}
	return r, newFallback(r, NewMemory(noFigure{}, 100), UseLocal, zap.NewNop())
}

// TestFallbackOutageKeepsWhatLeasesUsed: under UseLocal, requests Redis
// admitted before it stopped (a caller can hold them: they are admitted
// before their body is read) reserve their tokens in the instance's share
// of the token rate while it is down. What they used stays spent there
// when they are settled: the Redis settle that counts it waits for Redis,
// and a share given all back would lend the same tokens again and again.
func TestFallbackOutageKeepsWhatLeasesUsed(t *testing.T) {
	s := redistest.Start(t)
	_, f := localFallback(t, s, "recycle:")
	lim := &Limits{Tokens: Rate{N: 6000, Window: time.Minute, Burst: 600}} // 100 a second
	ctx := t.Context()
	var leases []Lease
	for range 20 {
		d, err := f.Admit(ctx, "c", lim, 0, time.Now())
		if err != nil || d.Reason != Admitted || d.Lease.ID == "" {
			t.Fatalf("before the outage: %+v %v", d, err)
		}
		leases = append(leases, d.Lease)
	}

	s.Pause(t)
	defer s.Resume(t)
	for !f.Down() {
		f.Admit(ctx, "c", lim, 0, time.Now()) // fails while the probe decides
		time.Sleep(20 * time.Millisecond)
	}
	begin := time.Now()
	time.Sleep(time.Second) // the share refills 100 tokens
	var used int64
	for _, l := range leases {
		d, err := f.Reserve(ctx, "c", lim, l, 100, time.Now())
		if err != nil || d.Reason != Admitted {
			continue
		}
		used += 100
		f.SettleDeferred("c", lim, d.Lease, 100, time.Now()) // it used all it reserved
	}
	elapsed := time.Since(begin)
	allowed := int64(100*elapsed.Seconds()) + 100 // a second more than the outage refilled
	if used == 0 || used > allowed {
		t.Errorf("Redis down for %v: %d tokens reserved and used by the 20 requests Redis had admitted, want 100 to %d (100 a second)", elapsed.Round(time.Millisecond), used, allowed)
	}
}

// TestFallbackChargesBeforeItAdmitsAgain: under UseLocal, a caller spends
// its burst, then Redis stops for 2.5 s. The instance admits its share of
// what the rate refills meanwhile, and owes it to Redis, whose own bucket
// refilled over the same time. Once Redis answers again, the charge goes
// before the caller's next requests: they are not admitted from that
// refill a second time, and the caller gets no more than the rate since
// its burst.
func TestFallbackChargesBeforeItAdmitsAgain(t *testing.T) {
	s := redistest.Start(t)
	r, f := localFallback(t, s, "recover:")
	lim := &Limits{Requests: Rate{N: 600, Window: time.Minute, Burst: 100}} // 10 a second
	ctx := t.Context()
	for i := range 100 {
		d, err := f.Admit(ctx, "c", lim, 0, time.Now())
		if err != nil || d.Reason != Admitted {
			t.Fatalf("the burst, request %d: %v %v", i, d.Reason, err)
		}
		f.SettleDeferred("c", lim, d.Lease, 0, time.Now())
	}
	spent := time.Now() // the bucket is empty: from now on, 10 a second

	s.Pause(t)
	var local int
	for begin := time.Now(); time.Since(begin) < 2500*time.Millisecond; time.Sleep(20 * time.Millisecond) {
		if d, err := f.Admit(ctx, "c", lim, 0, time.Now()); err == nil && d.Reason == Admitted {
			if d.Lease.ID != "" {
				t.Fatal("admitted by Redis while it is stopped")
			}
			local++
			f.SettleDeferred("c", lim, d.Lease, 0, time.Now())
		}
	}
	if !f.Down() {
		t.Fatal("the fallback is not in force")
	}
	s.Resume(t)
	for !r.Answers() {
		time.Sleep(time.Millisecond)
	}
	var wg sync.WaitGroup
	var again atomic.Int64
	for range 60 {
		wg.Go(func() {
			if d, err := f.Admit(ctx, "c", lim, 0, time.Now()); err == nil && d.Reason == Admitted {
				again.Add(1)
				f.SettleDeferred("c", lim, d.Lease, 0, time.Now())
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(spent)
	if allowed := int(10*elapsed.Seconds()) + 1; local+int(again.Load()) > allowed {
		t.Errorf("%d admitted locally during the outage and %d by Redis as it answered again, %v after the burst was spent: want at most %d (10 a second)",
			local, again.Load(), elapsed.Round(time.Millisecond), allowed)
	}
}

// TestFallbackBurstLeavesOthersTheirQueue: Redis is slow, not down (it
// answers within the timeout), while one caller sends a burst of 1,400
// requests to one instance. Another caller whose calls go through the
// burst's queue is still decided by Redis: the burst's calls past its
// share of the queue are refused, not the other caller's.
func TestFallbackBurstLeavesOthersTheirQueue(t *testing.T) {
	s := redistest.Start(t)
	r := newShortRedis(t, newRedisClient(t, s), "queue:", LeaseTTL, keepEnded)
	f := newFallback(r, NewMemory(noFigure{}, 100), UseLocal, zap.NewNop())
	lim := &Limits{Requests: Rate{N: 100_000, Window: time.Minute}}
	clients := sameQueue(r, 2)
	burst, other := clients[0], clients[1]
	if _, err := f.Admit(t.Context(), other, lim, 0, time.Now()); err != nil {
		t.Fatal(err)
	}

	s.Pause(t)
	var wg sync.WaitGroup
	var admitted atomic.Int64
	for range 1400 {
		wg.Go(func() {
			d, err := f.Admit(context.Background(), burst, lim, 0, time.Now())
			if err == nil && d.Reason == Admitted {
				admitted.Add(1)
				f.SettleDeferred(burst, lim, d.Lease, 0, time.Now())
			}
		})
	}
	time.Sleep(100 * time.Millisecond) // the burst is queued
	var d Decision
	var err error
	wg.Go(func() { d, err = f.Admit(context.Background(), other, lim, 0, time.Now()) })
	time.Sleep(200 * time.Millisecond)
	s.Resume(t)
	wg.Wait()
	if f.Down() {
		t.Fatal("Redis paused for 300 ms is held for down")
	}
	if err != nil || d.Reason != Admitted {
		t.Errorf("another caller's request beside the burst (%d of 1400 admitted): %+v %v, want admitted by Redis", admitted.Load(), d, err)
	}
}

// TestFallbackSlicedReserve: a request admitted from a slice whose
// reservation needs Redis while Redis fails is, under UseLocalUnshared,
// admitted unchecked (Settle charges Redis what it used) only when no
// quota or budget bounds it: a quota or budget is never spent unchecked.
func TestFallbackSlicedReserve(t *testing.T) {
	ctx := t.Context()
	lease := Lease{ID: sliceID, Reserved: 5, Local: 5}
	for _, tc := range []struct {
		name  string
		lim   Limits
		admit bool
	}{
		{"buckets only", Limits{Tokens: Rate{N: 1e9, Window: time.Minute}}, true},
		{"a budget", Limits{Quota: Quota{N: 1e10, Period: Month}}, false},
		{"a quota beside buckets", Limits{Tokens: Rate{N: 1e9, Window: time.Minute}, Quota: Quota{N: 1e12, Period: Day}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFallback(&flaky{Memory: NewMemory(nil, 100), down: true}, NewMemory(noFigure{}, 100), UseLocalUnshared, zap.NewNop())
			d, err := f.Reserve(ctx, "c", &tc.lim, lease, 100, t0)
			if tc.admit {
				if err != nil || d.Reason != Admitted || d.Lease != lease {
					t.Errorf("Redis down: %+v %v, want admitted unchecked, the lease as it was", d, err)
				}
				return
			}
			if !errors.Is(err, ErrUnavailable) || d.Lease != lease {
				t.Errorf("Redis down: %+v %v, want ErrUnavailable and the lease as it was", d, err)
			}
		})
	}
}

// TestFallbackReserveRedis: a lease Redis reports gone is the caller's
// error, not an outage; Redis killed is one, and a tier with a
// concurrency limit is refused meanwhile, its lease left as it was.
func TestFallbackReserveRedis(t *testing.T) {
	s := redistest.Start(t)
	ctx := t.Context()
	lim := &Limits{Tokens: Rate{N: 1000, Window: time.Hour}, Concurrent: 2}
	f := newFallback(newTimedRedis(t, newRedisClient(t, s), "fallback:", 200*time.Millisecond), NewMemory(noFigure{}, 100), UseLocal, zap.NewNop())

	d, err := f.Admit(ctx, "c", lim, 0, time.Now())
	if err != nil || d.Reason != Admitted || d.Lease.ID == "" {
		t.Fatalf("admit: %+v %v, want a Redis lease", d, err)
	}
	settled := d.Lease
	if err := f.Settle(ctx, "c", lim, settled, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	if d, err := f.Reserve(ctx, "c", lim, settled, 10, time.Now()); !errors.Is(err, ErrLeaseGone) || d.Lease != settled || f.Down() {
		t.Errorf("reserve on a settled lease: %+v %v, down %v; want ErrLeaseGone, the lease as it was, Redis still up", d, err, f.Down())
	}

	d, _ = f.Admit(ctx, "c", lim, 0, time.Now())
	lease := d.Lease
	s.Kill(t)
	for i := 0; !f.Down(); i++ {
		if i == 20 {
			t.Fatal("Redis killed: the fallback is not in force after 20 failed calls")
		}
		d, err = f.Reserve(ctx, "c", lim, lease, 10, time.Now())
		if !errors.Is(err, ErrUnavailable) || d.Lease != lease {
			t.Errorf("Redis killed: %+v %v, want ErrUnavailable and the lease %+v as it was", d, err, lease)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// failingLedger is a QuotaCounter in a store that fails, as a fleet's
// ledger in Redis does while Redis fails: at once, or, with hang, after
// the key store's 2 s timeout.
type failingLedger struct{ hang bool }

func (l failingLedger) QuotaUsed(ctx context.Context, _ string, _ time.Time) (int64, error) {
	if l.hang {
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
	return 0, errors.New("redis: connection refused")
}

// TestFallbackQuotaDuringOutage: under UseLocalUnshared, the operator's
// choice of availability over the fleet's limits, while the shared
// backend fails, a quota tier is decided locally within the timeout, from
// the last figure the
// shared backend gave plus what the instance counted since, never from a
// ledger in the failed store; when the shared backend answers again, its
// figure rules, and a later outage of the period still counts what the
// instance served in the earlier one.
func TestFallbackQuotaDuringOutage(t *testing.T) {
	const timeout = 50 * time.Millisecond
	ctx := t.Context()
	lim := &Limits{Quota: Quota{N: 10_000, Period: Day}}
	for _, tc := range []struct {
		name string
		hang bool
	}{{"refused", false}, {"stopped", true}} {
		t.Run(tc.name, func(t *testing.T) {
			shared := &flaky{Memory: NewMemory(nil, 100)}
			f := newFallback(shared, NewMemory(failingLedger{hang: tc.hang}, 100), UseLocalUnshared, zap.NewNop())
			shared.chargeQuota = true
			// request is one request as the handler makes it: admitted,
			// then its estimate reserved, then settled with what it used.
			request := func(what string, reserve, used int64, now time.Time) Decision {
				t.Helper()
				begin := time.Now()
				d, err := f.Admit(ctx, "c", lim, 0, now)
				if err == nil && d.Reason == Admitted {
					d, err = f.Reserve(ctx, "c", lim, d.Lease, reserve, now)
					if err == nil {
						if d.Reason != Admitted {
							used = 0
						}
						err = f.Settle(ctx, "c", lim, d.Lease, used, now)
					}
				}
				if took := time.Since(begin); err != nil || took > time.Second {
					t.Fatalf("%s: %v after %v, want a decision within the %v timeout", what, err, took, timeout)
				}
				return d
			}

			if d := request("up", 9_000, 9_000, t0); d.Reason != Admitted || d.QuotaUsed != 9_000 || d.Lease.ID != "shared" {
				t.Fatalf("up: %+v, want 9,000 used in the shared backend", d)
			}
			shared.down = true
			if d := request("down, first", 600, 600, t0); d.Reason != Admitted || d.QuotaUsed != 9_600 || d.Lease.ID != "" {
				t.Errorf("down, 600 more: %+v, want admitted locally at 9,000 seen + 600", d)
			}
			if d := request("down, second", 400, 400, t0); d.Reason != Admitted || d.QuotaUsed != 10_000 {
				t.Errorf("down, 400 more: %+v, want admitted locally at 10,000", d)
			}
			if d := request("down, third", 1, 1, t0); d.Reason != QuotaLimit {
				t.Errorf("down, 1 more: %+v, want refused: 1,000 served locally on top of the 9,000 seen", d)
			}
			begin := time.Now()
			if s, err := f.State(ctx, "c", lim, t0); err != nil || s.QuotaUsed != 10_000 || time.Since(begin) > time.Second {
				t.Errorf("down, state: %+v %v after %v, want the local 10,000 at once", s, err, time.Since(begin))
			}

			// Back up: the 1,000 served locally are charged to the shared
			// backend, whose figure rules.
			shared.down = false
			back := t0.Add(probeEvery)
			request("back up", 0, 0, back)
			if d := request("back up, again", 0, 0, back); d.Reason != Admitted || d.QuotaUsed != 10_000 || d.Lease.ID != "shared" {
				t.Errorf("back up: %+v, want the shared backend's 10,000: 9,000 and the 1,000 charged", d)
			}
			shared.down = true
			if d := request("down again", 1, 1, back); d.Reason != QuotaLimit || d.QuotaUsed != 10_000 {
				t.Errorf("down again, 1 more: %+v, want refused at 9,000 seen + 1,000 served locally", d)
			}
		})
	}
}

// BenchmarkFallbackAdmitReserveSettle is a request through a Fallback
// whose shared backend answers: what the Fallback adds to the shared
// backend's work, for a tier with a quota and one without.
func BenchmarkFallbackAdmitReserveSettle(b *testing.B) {
	rates := Limits{Requests: Rate{N: 600, Window: time.Minute}, Tokens: Rate{N: 400_000, Window: time.Minute}, Concurrent: 20}
	withQuota := rates
	withQuota.Quota = Quota{N: 50_000_000, Period: Month}
	for _, tc := range []struct {
		name string
		lim  *Limits
	}{{"quota", &withQuota}, {"no-quota", &rates}} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			names := make([]string, 10_000)
			for i := range names {
				names[i] = "key_" + strconv.Itoa(i)
			}
			f := newFallback(&flaky{Memory: NewMemory(nil, 2*len(names))}, NewMemory(noFigure{}, 2*len(names)), UseLocal, zap.NewNop())
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				c := names[i%len(names)]
				i++
				d, _ := f.Admit(ctx, c, tc.lim, 0, t0)
				if d, _ = f.Reserve(ctx, c, tc.lim, d.Lease, 100, t0); d.Reason != Admitted || d.Lease.ID == "" {
					b.Fatalf("%+v, want admitted by the shared backend", d)
				}
				f.Settle(ctx, c, tc.lim, d.Lease, 80, t0)
			}
		})
	}
}

// TestFallbackShareFollowsTheInstances: the live instances counted anew
// during an outage (one of them beat again just before it) change the
// share, and a bucket spent under the old share is spent under the new
// one, not in debt: it serves from what the new share refilled since,
// where it refused for most of a minute before. The settle of a request
// admitted under the old share may be the first call under the new one.
func TestFallbackShareFollowsTheInstances(t *testing.T) {
	ctx := context.Background()
	lim := &Limits{Requests: Rate{N: 1000, Window: time.Minute}}
	for _, settleFirst := range []bool{false, true} {
		shared := &flaky{Memory: NewMemory(nil, 100), down: true}
		f := newFallback(shared, NewMemory(noFigure{}, 100), UseLocal, zap.NewNop())
		if d, err := f.Admit(ctx, "c", lim, 0, t0); err != nil || d.Reason != RequestLimit {
			t.Fatalf("the outage's first request, alone: %+v %v, want refused by the empty share", d, err)
		}
		d, err := f.Admit(ctx, "c", lim, 0, t0.Add(time.Second)) // 16 refilled
		if err != nil || d.Reason != Admitted {
			t.Fatalf("a second later, alone: %+v %v, want admitted", d, err)
		}
		shared.instances = 2 // 500 every two minutes: one every 120 ms
		if settleFirst {
			if err := f.Settle(ctx, "c", lim, d.Lease, 0, t0.Add(time.Second)); err != nil {
				t.Fatal(err)
			}
		}
		d, err = f.Admit(ctx, "c", lim, 0, t0.Add(1200*time.Millisecond))
		if err != nil || d.Reason != Admitted {
			t.Errorf("settled first %v: two instances counted, 200 ms later: %+v %v, want admitted from the refill of the new share", settleFirst, d, err)
		}
	}
}
