package limiter

import (
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
)

// quotaCounters returns a client's quota counter of the period holding
// at, and what slices hold of it, as Redis keeps them.
func quotaCounters(t *testing.T, r *Redis, client string, lim *Limits, at time.Time) (counter, sliced int64) {
	t.Helper()
	key := r.keys(client)[2] + periodName(lim.Quota.Period, at)
	vals, err := r.client.MGet(t.Context(), key, key+":sliced").Result()
	if err != nil {
		t.Fatal(err)
	}
	n := [2]int64{}
	for i, v := range vals {
		if v != nil {
			n[i], _ = strconv.ParseInt(v.(string), 10, 64)
		}
	}
	return n[0], n[1]
}

// periodName names the UTC period holding at as redis_lib.lua does.
func periodName(p Period, at time.Time) string {
	if p == Month {
		return at.UTC().Format("2006-01")
	}
	return at.UTC().Format("2006-01-02")
}

// TestRedisSlicedQuotaNeverOverAdmits: two instances admitting from
// slices of one quota, with refunds, never let the requests use more than
// the quota, use nearly all of it, and leave Redis' counter at what was
// used once their slices are given back. Half the requests are admitted
// with their reservation (a budget's way), half admitted then reserved
// (a tier's way).
func TestRedisSlicedQuotaNeverOverAdmits(t *testing.T) {
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	fleet := [2]*Redis{newSlicingRedis(t, s, "quota:", LeaseTTL), newSlicingRedis(t, s, "quota:", LeaseTTL)}
	lim := &Limits{Quota: Quota{N: 10_000, Period: Month}} // slices of 100
	const reserve = 10
	var used, admitted, fromSlices atomic.Int64
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 300 {
				r := fleet[(g+i)%2]
				var d Decision
				var err error
				if g%2 == 0 {
					d, err = r.Admit(t.Context(), "c", lim, reserve, time.Now())
				} else if d, err = r.Admit(t.Context(), "c", lim, 0, time.Now()); err == nil && d.Reason == Admitted {
					d, err = r.Reserve(t.Context(), "c", lim, d.Lease, reserve, time.Now())
				}
				if err != nil {
					t.Error(err)
					return
				}
				if d.Reason != Admitted {
					if d.Lease.ID != "" {
						r.Settle(t.Context(), "c", lim, d.Lease, 0, time.Now())
					}
					continue
				}
				if d.Reason == Admitted && d.Lease.ID == sliceID {
					fromSlices.Add(1)
				}
				admitted.Add(1)
				u := int64(3 + rand.IntN(reserve-2)) // 3 to 10: refunds
				used.Add(u)
				if i%2 == 0 {
					r.SettleDeferred("c", lim, d.Lease, u, time.Now())
				} else if err := r.Settle(t.Context(), "c", lim, d.Lease, u, time.Now()); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	total := used.Load()
	t.Logf("%d requests admitted (%d from slices), %d of 10,000 used", admitted.Load(), fromSlices.Load(), total)
	if total > 10_000 {
		t.Errorf("%d used of a quota of 10,000 across two instances, want at most 10,000", total)
	}
	// Refused early by at most a reservation, and what two instances'
	// slices held unused (a slice and a half each) with the requests in
	// flight.
	if low := int64(10_000 - reserve - 2*150 - 8*reserve); total < low {
		t.Errorf("%d used of 10,000 when the requests stopped, want at least %d", total, low)
	}
	if fromSlices.Load() < admitted.Load()/2 {
		t.Errorf("%d of %d admitted from slices, want most", fromSlices.Load(), admitted.Load())
	}
	fleet[0].Close()
	fleet[1].Close()
	counter, sliced := quotaCounters(t, fleet[0], "c", lim, time.Now())
	if counter != total || sliced != 0 {
		t.Errorf("after Close: the quota counter %d, its slices %d; want %d (what was used) and 0", counter, sliced, total)
	}
	check := newTestRedis(t, newRedisClient(t, s), "quota:")
	if st, err := check.State(t.Context(), "c", lim, time.Now()); err != nil || st.QuotaUsed != total {
		t.Errorf("State after Close: %d used (%v), want %d", st.QuotaUsed, err, total)
	}
}

// TestRedisQuotaSliceIsNotUsed: what a slice holds of a quota counts as
// used in Redis' counter (so that no other instance spends it), but not
// in the standing anyone is told: headers, /v1/usage and alerts read what
// was used, the instance that holds the slice with what it gave out of
// it. Given back sliceTTL after its claim, it leaves the counter at what
// was used.
func TestRedisQuotaSliceIsNotUsed(t *testing.T) {
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	r := newSlicingRedis(t, s, "held:", 600*time.Millisecond) // a tick every 200 ms
	check := newTestRedis(t, newRedisClient(t, s), "held:")
	lim := &Limits{Quota: Quota{N: 100_000, Period: Day}} // slices of 1,000
	ctx := t.Context()

	d, err := r.Admit(ctx, "c", lim, 10, time.Now())
	if err != nil || d.Reason != Admitted || d.Lease.ID == sliceID {
		t.Fatalf("the first admission, which claims: %v %+v %v", d.Reason, d.Lease, err)
	}
	if d.QuotaUsed != 10 {
		t.Errorf("the claiming admission's standing: %d used, want 10", d.QuotaUsed)
	}
	if counter, sliced := quotaCounters(t, r, "c", lim, time.Now()); counter != 1010 || sliced != 1000 {
		t.Errorf("after the claim: counter %d, sliced %d; want 1,010 and 1,000", counter, sliced)
	}
	if st, err := check.State(ctx, "c", lim, time.Now()); err != nil || st.QuotaUsed != 10 {
		t.Errorf("another instance's State: %d used (%v), want 10", st.QuotaUsed, err)
	}
	if err := r.Settle(ctx, "c", lim, d.Lease, 4, time.Now()); err != nil {
		t.Fatal(err)
	}
	d, err = r.Admit(ctx, "c", lim, 10, time.Now())
	if err != nil || d.Reason != Admitted || d.Lease.ID != sliceID {
		t.Fatalf("the second admission, from the slice: %v %+v %v", d.Reason, d.Lease, err)
	}
	// The slice's standing is Redis' at the claim plus what it gave out
	// since: never less than what was used (14).
	if d.QuotaUsed < 14 || d.QuotaUsed > 20 {
		t.Errorf("the standing of a request admitted from the slice: %d used, want 14 to 20", d.QuotaUsed)
	}
	// Its own State counts what its slice gave out (10 reserved, beside
	// the 4 used); another instance's sees it once the slice is back.
	if st, err := r.State(ctx, "c", lim, time.Now()); err != nil || st.QuotaUsed != 14 {
		t.Errorf("the instance's own State: %d used (%v), want 14", st.QuotaUsed, err)
	}
	if st, err := check.State(ctx, "c", lim, time.Now()); err != nil || st.QuotaUsed != 4 {
		t.Errorf("another instance's State: %d used (%v), want 4", st.QuotaUsed, err)
	}
	r.SettleDeferred("c", lim, d.Lease, 7, time.Now())
	settledWithin(t, check, lim, func(State) bool {
		counter, sliced := quotaCounters(t, r, "c", lim, time.Now())
		return counter == 11 && sliced == 0
	}, "the slice given back: the counter at what was used (4 + 7)")
}

// TestRedisQuotaSliceFollowsItsPeriod: a slice claimed in one period is
// given back to that period's counter, not to the counter of the period
// it is given back in; a request admitted from a slice of one period
// settles in that period, never into a slice of the next.
func TestRedisQuotaSliceFollowsItsPeriod(t *testing.T) {
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	r := newSlicingRedis(t, s, "period:", LeaseTTL)
	lim := &Limits{Quota: Quota{N: 100_000, Period: Day}}
	yesterday := time.Now().Add(-24 * time.Hour)
	key := r.keys("c")[2] + periodName(Day, yesterday)
	if err := r.client.Set(t.Context(), key, 5000, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	if err := r.client.Set(t.Context(), key+":sliced", 1000, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}

	// Settling a request of yesterday's slice beside today's slice.
	r.slices.m["c"] = &slice{lim: *lim, tokens: 1000, got: 1000, at: time.Now().UnixMilli(), claimed: time.Now()}
	lease := Lease{Reserved: 10, Local: 10, ID: sliceID, Period: yesterday.UnixMilli()}
	if delta := r.settleSliced("c", lim, lease, 4); delta != -6 {
		t.Errorf("a request of yesterday's slice settled beside today's: %d for Redis, want -6 (its refund, in its period)", delta)
	}
	if s := r.slices.m["c"]; s.tokens != 1000 {
		t.Errorf("today's slice took %d tokens of yesterday's request", s.tokens-1000)
	}
	if _, ok := r.reserveFromSlice("c", lim, lease, 5); ok {
		t.Error("a request of yesterday's slice reserved from today's")
	}
	lease.Period = time.Now().UnixMilli()
	if delta := r.settleSliced("c", lim, lease, 4); delta != 0 || r.slices.m["c"].tokens != 1006 {
		t.Errorf("a request of today's slice: %d for Redis and the slice at %d, want 0 and 1,006", delta, r.slices.m["c"].tokens)
	}
	delete(r.slices.m, "c")

	// Yesterday's slice given back today: 400 of its 1,000 unused.
	r.slices.mu.Lock()
	r.giveBack("c", &slice{lim: *lim, tokens: 400, got: 1000, at: yesterday.UnixMilli()})
	r.slices.mu.Unlock()
	settledWithin(t, r, lim, func(State) bool {
		counter, sliced := quotaCounters(t, r, "c", lim, yesterday)
		return counter == 4600 && sliced == 0
	}, "yesterday's counter at 4,600, its slices at 0")
	if counter, _ := quotaCounters(t, r, "c", lim, time.Now()); counter != 0 {
		t.Errorf("today's counter: %d, want 0: nothing of yesterday's slice", counter)
	}
	if ttl := r.client.TTL(t.Context(), key).Val(); ttl <= 0 {
		t.Errorf("yesterday's counter lost its expiry: %v", ttl)
	}
}

// TestRedisLostQuotaClaimIsGivenBack: an admission that claimed slices of
// a client's buckets and quota, whose answer the instance never got, is
// cancelled, and its cancellation gives back the request, its reservation
// and what it claimed: a Redis that stalls does not eat a month's quota a
// slice at a time.
func TestRedisLostQuotaClaimIsGivenBack(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	r := newShortRedis(t, c, "lostclaim:", 3*time.Second, keepEnded) // retries every second
	// The large one's claim, 10^15, is a number Lua would write as 1e+15.
	for _, quota := range []int64{1_000_000, 100_000_000_000_000_000} {
		t.Run(strconv.FormatInt(quota, 10), func(t *testing.T) {
			client := "c" + strconv.FormatInt(quota, 10)
			lim := &Limits{Requests: Rate{N: 100_000, Window: time.Hour}, Quota: Quota{N: quota, Period: Month}}
			claim := quota / 100
			args := limitArgs(nil, lim)
			args = append(args, 30, r.leaseTTL.Milliseconds(), "lost-claim", 0, 1000, claim)
			vals, err := admitScript.Run(t.Context(), c, r.keys(client), args...).Slice()
			if err != nil || len(vals) != 12 || vals[10] != int64(1000) || vals[11] != claim {
				t.Fatalf("the admission that claims: %v %v, want 1,000 requests and %d tokens claimed", vals, err, claim)
			}
			if counter, sliced := quotaCounters(t, r, client, lim, time.Now()); counter != claim+30 || sliced != claim {
				t.Fatalf("after the claim: counter %d, sliced %d; want %d and %d", counter, sliced, claim+30, claim)
			}
			r.cancelLater(client, lim, "lost-claim")
			testcheck.WaitFor(t, 5*time.Second, "the lost claim given back: requests, reservation and slices", func() bool {
				st, err := r.State(t.Context(), client, lim, time.Now())
				counter, sliced := quotaCounters(t, r, client, lim, time.Now())
				return err == nil && counter == 0 && sliced == 0 && st.RequestsRemaining == 100_000 && st.InFlight == 0
			})
			if n, err := c.HLen(t.Context(), r.keys(client)[3]).Result(); err != nil && err != redis.Nil || n != 0 {
				t.Errorf("the lease's reservation and claim notes: %d left (%v), want none", n, err)
			}
		})
	}
}

// TestRedisLostClaimOfAnExpiredLease: a stall longer than the lease's
// TTL. The admission that claimed ran, its answer was lost, its lease
// expired and another admission of the client dropped it, and only then
// does the cancellation reach Redis: it still gives back the request,
// the reservation and the claim.
func TestRedisLostClaimOfAnExpiredLease(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	r := newShortRedis(t, c, "expiredclaim:", 3*time.Second, keepEnded)
	// A bucket that refills by less than a request during the test.
	lim := &Limits{Requests: Rate{N: 100_000, Window: 1000 * time.Hour}, Quota: Quota{N: 1_000_000, Period: Month}}
	const claim = 10_000
	admit := func(id string, ttl time.Duration, claimed ...any) []any {
		t.Helper()
		args := append(limitArgs(nil, lim), 30, ttl.Milliseconds(), id, 0)
		vals, err := admitScript.Run(t.Context(), c, r.keys("c"), append(args, claimed...)...).Slice()
		if err != nil || vals[0] != int64(0) {
			t.Fatalf("admission %s: %v %v", id, vals, err)
		}
		return vals
	}
	admit("running", time.Minute) // keeps the notes of the client's leases
	if vals := admit("lost-claim", 50*time.Millisecond, 1000, claim); len(vals) != 12 || vals[11] != int64(claim) {
		t.Fatalf("the admission that claims: %v, want %d tokens claimed", vals, claim)
	}
	time.Sleep(100 * time.Millisecond)
	admit("after", time.Minute) // drops the expired lease
	if err := c.ZScore(t.Context(), r.keys("c")[1], "lost-claim").Err(); err != redis.Nil {
		t.Fatalf("the expired lease is still in the set (%v): the test does not test the dropped lease", err)
	}
	if counter, sliced := quotaCounters(t, r, "c", lim, time.Now()); counter != 3*30+claim || sliced != claim {
		t.Fatalf("before the cancellation: counter %d, sliced %d; want %d and %d", counter, sliced, 3*30+claim, claim)
	}
	r.cancelLater("c", lim, "lost-claim")
	testcheck.WaitFor(t, 5*time.Second, "the claim of the expired lease given back: its request, reservation and slices", func() bool {
		st, err := r.State(t.Context(), "c", lim, time.Now())
		counter, sliced := quotaCounters(t, r, "c", lim, time.Now())
		return err == nil && counter == 2*30 && sliced == 0 && st.RequestsRemaining == 100_000-2 && st.InFlight == 2
	})
}

// TestRedisQuotaEndIsExact: no slice is claimed once fewer than ten
// slices would be left of a quota: the last of it is decided by Redis.
func TestRedisQuotaEndIsExact(t *testing.T) {
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	r := newSlicingRedis(t, s, "end:", LeaseTTL)
	lim := &Limits{Quota: Quota{N: 10_000, Period: Month}} // slices of 100
	key := r.keys("c")[2] + periodName(Month, time.Now())
	if err := r.client.Set(context.Background(), key, 10_000-1_000, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		d, err := r.Admit(t.Context(), "c", lim, 10, time.Now())
		if err != nil || d.Reason != Admitted {
			t.Fatalf("request %d: %v %v", i, d.Reason, err)
		}
		if d.Lease.ID == sliceID {
			t.Fatalf("request %d admitted from a slice with 1,000 of 10,000 left", i)
		}
		r.SettleDeferred("c", lim, d.Lease, 10, time.Now())
	}
	if counter, sliced := quotaCounters(t, r, "c", lim, time.Now()); sliced != 0 || counter > 9_200 {
		t.Errorf("counter %d, sliced %d; want 9,200 at most and none", counter, sliced)
	}
}

// stallingSlices starts a redis-server that a test may stop, and an
// instance that slices a quota of 100,000 a day (slices of 1,000) and
// gives Redis timeout to answer.
func stallingSlices(t *testing.T, prefix string, timeout time.Duration) (*redistest.Server, *Redis, *Limits) {
	t.Helper()
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	r := newTimedRedis(t, newRedisClient(t, s), prefix, timeout)
	r.slicing.Store(true)
	return s, r, &Limits{Quota: Quota{N: 100_000, Period: Day}}
}

// claimSlice has r admit a request of 10 tokens, which claims a slice,
// and settles it.
func claimSlice(t *testing.T, r *Redis, lim *Limits) {
	t.Helper()
	d, err := r.Admit(t.Context(), "c", lim, 10, time.Now())
	if err != nil || d.Reason != Admitted || d.Lease.fromSlice() {
		t.Fatalf("the admission that claims: %+v %v", d, err)
	}
	if err := r.Settle(t.Context(), "c", lim, d.Lease, 10, time.Now()); err != nil {
		t.Fatal(err)
	}
}

// TestRedisGiveBackIsRetriedOnce: a give-back sent to a Redis that
// stalled, which runs it once it goes on, is retried, and the retry
// changes nothing: what the slice held goes back exactly once.
func TestRedisGiveBackIsRetriedOnce(t *testing.T) {
	s, r, lim := stallingSlices(t, "giveback:", 200*time.Millisecond)
	claimSlice(t, r, lim)
	s.Pause(t)
	r.slices.mu.Lock()
	sl := r.slices.m["c"]
	if sl == nil || sl.id == "" || sl.got != 1000 {
		r.slices.mu.Unlock()
		t.Fatalf("the slice claimed: %+v, want 1,000 tokens and the claim's ID", sl)
	}
	r.giveBack("c", sl)
	r.slices.mu.Unlock()
	testcheck.WaitFor(t, 5*time.Second, "the give-back sent to the stalled Redis waits for a retry", func() bool { return r.retries.len() == 1 })
	s.Resume(t)
	testcheck.WaitFor(t, 10*time.Second, "the retry lands", func() bool { return r.retries.len() == 0 })
	if counter, sliced := quotaCounters(t, r, "c", lim, time.Now()); counter != 10 || sliced != 0 {
		t.Errorf("after the give-back and its retry: counter %d, sliced %d; want 10 and 0: given back once", counter, sliced)
	}
}

// stalledPastProbe stops redis-server for longer than an instance's probe
// gives it, and runs call meanwhile, so that a call sent before the stall
// fails with ErrDown, though Redis runs it once it goes on.
func stalledPastProbe(t *testing.T, s *redistest.Server, call func() error) error {
	t.Helper()
	s.Pause(t)
	defer s.Resume(t)
	return call()
}

// TestRedisAdmissionSentBeforeDownIsCancelled: an admission sent to a
// Redis that stalls past the probe fails with ErrDown, and the instance
// decides without it; Redis runs the admission once it goes on. Its
// cancellation gives back its request, reservation and claimed slice all
// the same: only a call never sent needs none.
func TestRedisAdmissionSentBeforeDownIsCancelled(t *testing.T) {
	s, r, lim := stallingSlices(t, "sentdown:", 100*time.Millisecond)
	// A connection made before the stall: a new one would wait for its
	// handshake, and send nothing.
	if _, err := r.State(t.Context(), "other", lim, time.Now()); err != nil {
		t.Fatal(err)
	}
	err := stalledPastProbe(t, s, func() error {
		_, err := r.Admit(t.Context(), "c", lim, 10, time.Now())
		return err
	})
	if !errors.Is(err, ErrDown) || unsent(err) {
		t.Fatalf("the admission sent before the stall: %v, want ErrDown of a call that was sent", err)
	}
	testcheck.WaitFor(t, 5*time.Second, "the admission that ran after the stall given back: its reservation and claim", func() bool {
		counter, sliced := quotaCounters(t, r, "c", lim, time.Now())
		return counter == 0 && sliced == 0
	})
}

// TestRedisSlicedCallsThroughAStall: the calls a request admitted from a
// slice makes to Redis, while Redis stalls past the probe: a reservation
// its slice cannot hold, whose answer is lost though Redis makes it, and
// a settle its slice cannot take (given back meanwhile). The settle is
// retried once Redis answers, counts once, and gives back the lost
// reservation too: Redis' counter ends at what the request used.
func TestRedisSlicedCallsThroughAStall(t *testing.T) {
	s, r, lim := stallingSlices(t, "slicedstall:", 100*time.Millisecond)
	claimSlice(t, r, lim)
	d, err := r.Admit(t.Context(), "c", lim, 100, time.Now())
	if err != nil || d.Reason != Admitted || d.Lease.ID != sliceID {
		t.Fatalf("the request from the slice: %+v %v", d, err)
	}
	err = stalledPastProbe(t, s, func() error {
		d, err = r.Reserve(t.Context(), "c", lim, d.Lease, 5_000, time.Now())
		return err
	})
	if !errors.Is(err, ErrDown) || !d.Lease.fromSlice() || d.Lease.ID == sliceID {
		t.Fatalf("the reservation past the slice sent before the stall: %+v %v, want ErrDown and the lease named", d.Lease, err)
	}
	testcheck.WaitFor(t, 5*time.Second, "Redis answers again, the reservation made", func() bool {
		counter, _ := quotaCounters(t, r, "c", lim, time.Now())
		return counter == 10+1_000+5_000 && r.health.pass()
	})
	r.giveBackStale(time.Now().Add(sliceTTL))
	testcheck.WaitFor(t, 5*time.Second, "the slice given back", func() bool {
		counter, sliced := quotaCounters(t, r, "c", lim, time.Now())
		return counter == 10+100+5_000 && sliced == 0
	})
	err = stalledPastProbe(t, s, func() error {
		return r.Settle(t.Context(), "c", lim, d.Lease, 40, time.Now())
	})
	if err == nil {
		t.Fatal("the settle sent before the stall landed: the test does not test a lost settle")
	}
	testcheck.WaitFor(t, 5*time.Second, "the settle retried: Redis counts what the request used, and no reservation", func() bool {
		counter, sliced := quotaCounters(t, r, "c", lim, time.Now())
		return counter == 10+40 && sliced == 0 && r.retries.len() == 0
	})
	time.Sleep(1100 * time.Millisecond) // a retry more would land within a second
	if counter, _ := quotaCounters(t, r, "c", lim, time.Now()); counter != 10+40 {
		t.Errorf("counter %d after the retry, want %d: counted twice", counter, 10+40)
	}
}
