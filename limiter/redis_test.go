package limiter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// newRedisClient returns a go-redis client on s, configured as an instance
// of a fleet should be: the context's deadline bounds every call.
func newRedisClient(t testing.TB, s *redistest.Server) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: s.Addr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { c.Close() })
	return c
}

// redisNow returns the Redis server's clock, which the scripts use.
func redisNow(t testing.TB, c *redis.Client) time.Time {
	t.Helper()
	tm, err := c.Time(t.Context()).Result()
	if err != nil {
		t.Fatal(err)
	}
	return tm
}

// snapshot returns every key under prefix with its type, content and
// whether it expires: what a refusal must leave alone.
func snapshot(t testing.TB, c *redis.Client, prefix string) map[string]string {
	t.Helper()
	ctx := t.Context()
	keys, err := c.Keys(ctx, prefix+"*").Result()
	// The set of live instances is the instances', not a client's.
	keys = slices.DeleteFunc(keys, func(k string) bool { return k == prefix+instancesKey })
	if err != nil {
		t.Fatal(err)
	}
	snap := make(map[string]string, len(keys))
	for _, k := range keys {
		var v any
		switch typ := c.Type(ctx, k).Val(); typ {
		case "hash":
			v = c.HGetAll(ctx, k).Val()
		case "zset":
			v = c.ZRangeWithScores(ctx, k, 0, -1).Val()
		case "string":
			v = c.Get(ctx, k).Val()
		default:
			t.Fatalf("key %s of unexpected type %s", k, typ)
		}
		snap[k] = fmt.Sprintf("%v expires:%v", v, c.PTTL(ctx, k).Val() > 0)
	}
	return snap
}

// within fails unless want-tol <= got <= want: Redis' clock moves on
// between the calls of a test, so durations only shrink.
func within(t testing.TB, what string, got, want, tol time.Duration) {
	t.Helper()
	if got > want || got < want-tol {
		t.Errorf("%s: got %v, want %v (at most %v less)", what, got, want, tol)
	}
}

func TestRedisExactAcrossInstances(t *testing.T) {
	s := redistest.Start(t)
	// A window of an hour refills less than one request while the test runs:
	// the burst of 100 is all there is.
	lim := &Limits{Requests: Rate{N: 100, Window: time.Hour, Burst: 100}}
	for _, instances := range []int{1, 2} {
		t.Run(strconv.Itoa(instances)+" instances", func(t *testing.T) {
			fleet := make([]*Redis, instances)
			for i := range fleet {
				fleet[i] = newTestRedis(t, newRedisClient(t, s), "exact"+strconv.Itoa(instances)+":")
			}
			var admitted atomic.Int64
			perInstance := make([]atomic.Int64, instances)
			var wg sync.WaitGroup
			for g := range 50 {
				wg.Go(func() {
					r := fleet[g%instances]
					for range 10 {
						d, err := r.Admit(t.Context(), "c", lim, 0, time.Now())
						if err != nil {
							t.Error(err)
							return
						}
						if d.Reason == Admitted {
							admitted.Add(1)
							perInstance[g%instances].Add(1)
							if err := r.Settle(t.Context(), "c", lim, d.Lease, 0, time.Now()); err != nil {
								t.Error(err)
							}
						} else if d.Reason != RequestLimit {
							t.Errorf("refused for %v, want requests", d.Reason)
						}
					}
				})
			}
			wg.Wait()
			if got := admitted.Load(); got != 100 {
				t.Fatalf("admitted %d of 500 across %d instances, want exactly 100", got, instances)
			}
			for i := range perInstance {
				if perInstance[i].Load() == 0 {
					t.Errorf("instance %d admitted nothing: the test did not exercise both", i)
				}
			}
		})
	}
}

func TestRedisRetryAfterIsEnough(t *testing.T) {
	s := redistest.Start(t)
	r := newTestRedis(t, newRedisClient(t, s), "retry:")
	ctx := t.Context()
	for _, tc := range []struct {
		name    string
		lim     Limits
		reserve int64
		reason  Reason
		max     time.Duration
	}{
		{"requests", Limits{Requests: Rate{N: 20, Window: time.Second, Burst: 1}}, 0, RequestLimit, 50 * time.Millisecond},
		{"tokens", Limits{Tokens: Rate{N: 1000, Window: 100 * time.Millisecond}}, 1000, TokenLimit, 100 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if d, err := r.Admit(ctx, tc.name, &tc.lim, tc.reserve, time.Now()); err != nil || d.Reason != Admitted {
				t.Fatalf("first: %v %v, want admitted", d.Reason, err)
			}
			d, err := r.Admit(ctx, tc.name, &tc.lim, tc.reserve, time.Now())
			if err != nil || d.Reason != tc.reason || d.RetryAfter <= 0 || d.RetryAfter > tc.max {
				t.Fatalf("second: %v retry %v %v, want %v within %v", d.Reason, d.RetryAfter, err, tc.reason, tc.max)
			}
			time.Sleep(d.RetryAfter)
			if d, err := r.Admit(ctx, tc.name, &tc.lim, tc.reserve, time.Now()); err != nil || d.Reason != Admitted {
				t.Errorf("after waiting RetryAfter: %v %v, want admitted", d.Reason, err)
			}
		})
	}
}

func TestRedisRefusalReasons(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	ctx := t.Context()
	admit := func(reserve int64) func(r *Redis, lim *Limits) {
		return func(r *Redis, lim *Limits) {
			if d, err := r.Admit(ctx, "c", lim, reserve, time.Now()); err != nil || d.Reason != Admitted {
				t.Fatalf("setup: %v %v, want admitted", d.Reason, err)
			}
		}
	}
	const untilDayEnd = -2 // retry: until the end of the UTC day
	cases := []struct {
		name    string
		lim     Limits
		setup   []func(r *Redis, lim *Limits)
		reserve int64
		want    Reason
		retry   time.Duration
	}{
		{
			name: "requests", lim: Limits{Requests: Rate{N: 60, Window: time.Minute, Burst: 1}},
			setup: []func(*Redis, *Limits){admit(0)}, want: RequestLimit, retry: time.Second,
		},
		{
			name: "tokens", lim: Limits{Tokens: Rate{N: 1000, Window: time.Minute}},
			setup: []func(*Redis, *Limits){admit(900)}, reserve: 200, want: TokenLimit, retry: 6 * time.Second,
		},
		{
			name: "more than the token burst", lim: Limits{Tokens: Rate{N: 1000, Window: time.Minute}},
			reserve: 1001, want: TooLarge, retry: -1,
		},
		{
			name: "concurrency", lim: Limits{Concurrent: 2},
			setup: []func(*Redis, *Limits){admit(0), admit(0)}, want: ConcurrencyLimit, retry: time.Second,
		},
		{
			name: "daily quota", lim: Limits{Quota: Quota{N: 100, Period: Day}},
			setup: []func(*Redis, *Limits){admit(90)}, reserve: 20, want: QuotaLimit, retry: untilDayEnd,
		},
		// The order: the first limit that refuses names the refusal.
		{
			name: "too large before concurrency", lim: Limits{Tokens: Rate{N: 1000, Window: time.Minute}, Concurrent: 1},
			setup: []func(*Redis, *Limits){admit(0)}, reserve: 1001, want: TooLarge, retry: -1,
		},
		{
			name: "concurrency before quota", lim: Limits{Concurrent: 1, Quota: Quota{N: 100, Period: Day}},
			setup: []func(*Redis, *Limits){admit(100)}, reserve: 1, want: ConcurrencyLimit, retry: time.Second,
		},
		{
			name: "quota before requests", lim: Limits{Quota: Quota{N: 100, Period: Day}, Requests: Rate{N: 60, Window: time.Minute, Burst: 1}},
			setup: []func(*Redis, *Limits){admit(100)}, reserve: 1, want: QuotaLimit, retry: untilDayEnd,
		},
		{
			name: "requests before tokens", lim: Limits{Requests: Rate{N: 60, Window: time.Minute, Burst: 1}, Tokens: Rate{N: 1000, Window: time.Minute}},
			setup: []func(*Redis, *Limits){admit(1000)}, reserve: 1, want: RequestLimit, retry: time.Second,
		},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			prefix := "refuse" + strconv.Itoa(i) + ":"
			r := newTestRedis(t, c, prefix)
			for _, f := range tc.setup {
				f(r, &tc.lim)
			}
			keys := snapshot(t, c, prefix)
			before, err := r.State(ctx, "c", &tc.lim, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			want := tc.retry
			if want == untilDayEnd {
				now := redisNow(t, c)
				want = Day.End(now).Sub(now)
			}
			d, err := r.Admit(ctx, "c", &tc.lim, tc.reserve, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			if d.Reason != tc.want || d.Lease != (Lease{}) {
				t.Errorf("got %v lease %+v, want %v and no lease", d.Reason, d.Lease, tc.want)
			}
			within(t, "retry after", d.RetryAfter, want, time.Second)
			after, err := r.State(ctx, "c", &tc.lim, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			if after.RequestsRemaining != before.RequestsRemaining || after.TokensRemaining != before.TokensRemaining ||
				after.QuotaUsed != before.QuotaUsed || after.QuotaReset != before.QuotaReset || after.InFlight != before.InFlight {
				t.Errorf("a refusal changed the state: %+v → %+v", before, after)
			}
			within(t, "requests reset", after.RequestsReset, before.RequestsReset, time.Second)
			within(t, "tokens reset", after.TokensReset, before.TokensReset, time.Second)
			if got := snapshot(t, c, prefix); !maps.Equal(got, keys) {
				t.Errorf("a refusal changed the keys:\n%v\n→\n%v", keys, got)
			}
		})
	}
}

func TestRedisSettleReplacesReservation(t *testing.T) {
	s := redistest.Start(t)
	r := newTestRedis(t, newRedisClient(t, s), "settle:")
	ctx := t.Context()
	// The figures of TestMemorySettleReplacesReservation, with a window so
	// long (a token an hour) that Redis' moving clock refills nothing that
	// shows.
	lim := &Limits{Tokens: Rate{N: 1000, Window: 1000 * time.Hour}, Quota: Quota{N: 5000, Period: Month}, Concurrent: 1}
	d, err := r.Admit(ctx, "c", lim, 500, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if d.Reason != Admitted || d.TokensRemaining != 500 || d.QuotaUsed != 500 || d.InFlight != 1 || d.Lease.Reserved != 500 || d.Lease.ID == "" {
		t.Fatalf("after admit: %+v, want 500 reserved and 1 in flight", d)
	}
	if err := r.Settle(ctx, "c", lim, d.Lease, 120, time.Now()); err != nil { // used less: refund
		t.Fatal(err)
	}
	st, _ := r.State(ctx, "c", lim, time.Now())
	if st.TokensRemaining != 880 || st.QuotaUsed != 120 || st.InFlight != 0 {
		t.Errorf("after settling 120 of 500: %+v, want 880 left, quota 120, none in flight", st)
	}
	d, _ = r.Admit(ctx, "c", lim, 100, time.Now())
	if err := r.Settle(ctx, "c", lim, d.Lease, 1100, time.Now()); err != nil { // used more: charged, into debt
		t.Fatal(err)
	}
	st, _ = r.State(ctx, "c", lim, time.Now())
	if st.TokensRemaining != 0 || st.QuotaUsed != 1220 {
		t.Errorf("after settling 1100 of 100: %+v, want 0 left, quota 1220", st)
	}
	d, _ = r.Admit(ctx, "c", lim, 1, time.Now())
	if d.Reason != TokenLimit {
		t.Errorf("in debt: %v, want tokens", d.Reason)
	}
	within(t, "in debt, retry after (221 tokens at 1000/1000h)", d.RetryAfter, 221*time.Hour, time.Second)
}

// TestRedisReserve runs the cases of TestMemoryReserve: the same figures
// and refusals, and a refusal writes nothing.
func TestRedisReserve(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	for i, tc := range reserveCases {
		t.Run(tc.name, func(t *testing.T) {
			prefix := "reserve" + strconv.Itoa(i) + ":"
			testReserve(t, newTestRedis(t, c, prefix), tc, time.Now)
			// Once more, to compare the keys around a Reserve.
			r := newTestRedis(t, c, "again"+prefix)
			lim := reserveLimits(tc.quota)
			if tc.earlier > 0 {
				d, _ := r.Admit(t.Context(), "c", lim, 0, time.Now())
				r.Settle(t.Context(), "c", lim, d.Lease, tc.earlier, time.Now())
			}
			d, err := r.Admit(t.Context(), "c", lim, tc.held, time.Now())
			if err != nil || d.Reason != Admitted {
				t.Fatalf("admit: %v %v, want admitted", d.Reason, err)
			}
			keys := snapshot(t, c, "again"+prefix)
			if d, err := r.Reserve(t.Context(), "c", lim, d.Lease, tc.tokens, time.Now()); err != nil || d.Reason != tc.want {
				t.Fatalf("reserve: %v %v, want %v", d.Reason, err, tc.want)
			}
			got := snapshot(t, c, "again"+prefix)
			if tc.want != Admitted && !maps.Equal(got, keys) {
				t.Errorf("a refusal changed the keys:\n%v\n→\n%v", keys, got)
			}
			if tc.want == Admitted && maps.Equal(got, keys) {
				t.Errorf("a reservation left the keys as they were: %v", keys)
			}
		})
	}
}

// TestReserveMemoryAndRedisAgree runs one client's requests, admitted
// before their bodies are read, against both backends: every decision and
// standing must be the same.
func TestReserveMemoryAndRedisAgree(t *testing.T) {
	s := redistest.Start(t)
	lim := reserveLimits(1500)
	type step struct {
		op       string // admit, reserve or settle
		req      int    // which request
		n        int64  // tokens reserved or used
		want     Reason
		reserved int64    // the request's lease after the step
		state    [4]int64 // requests left, tokens left, quota used, in flight
	}
	steps := []step{
		{op: "admit", req: 0, want: Admitted, state: [4]int64{9, 1000, 0, 1}},
		{op: "reserve", req: 0, n: 1001, want: TooLarge, state: [4]int64{9, 1000, 0, 1}},
		{op: "reserve", req: 0, n: 600, want: Admitted, reserved: 600, state: [4]int64{9, 400, 600, 1}},
		{op: "reserve", req: 0, n: 401, want: TooLarge, reserved: 600, state: [4]int64{9, 400, 600, 1}},
		{op: "admit", req: 1, want: Admitted, state: [4]int64{8, 400, 600, 2}},
		{op: "admit", req: 2, want: ConcurrencyLimit, state: [4]int64{8, 400, 600, 2}},
		{op: "reserve", req: 1, n: 500, want: TokenLimit, state: [4]int64{8, 400, 600, 2}},
		{op: "reserve", req: 1, n: 400, want: Admitted, reserved: 400, state: [4]int64{8, 0, 1000, 2}},
		{op: "settle", req: 0, n: 100, reserved: 600, state: [4]int64{8, 500, 500, 1}},
		{op: "admit", req: 2, want: Admitted, state: [4]int64{7, 500, 500, 2}},
		// Into debt and beyond the quota.
		{op: "settle", req: 1, n: 1450, reserved: 400, state: [4]int64{7, 0, 1550, 1}},
		{op: "reserve", req: 2, n: 0, want: QuotaLimit, state: [4]int64{7, 0, 1550, 1}},
		{op: "settle", req: 2, n: 0, state: [4]int64{7, 0, 1550, 0}},
		{op: "admit", req: 3, want: QuotaLimit, state: [4]int64{7, 0, 1550, 0}},
	}
	for _, b := range []struct {
		name string
		l    Limiter
		now  func() time.Time
	}{
		{"memory", NewMemory(nil, 100), func() time.Time { return t0 }},
		{"redis", newTestRedis(t, newRedisClient(t, s), "agree:"), time.Now},
	} {
		t.Run(b.name, func(t *testing.T) {
			ctx := t.Context()
			var leases [4]Lease
			for i, st := range steps {
				var d Decision
				var err error
				switch st.op {
				case "admit":
					if d, err = b.l.Admit(ctx, "c", lim, 0, b.now()); d.Reason == Admitted {
						leases[st.req] = d.Lease
					}
				case "reserve":
					d, err = b.l.Reserve(ctx, "c", lim, leases[st.req], st.n, b.now())
					leases[st.req] = d.Lease
				case "settle":
					err = b.l.Settle(ctx, "c", lim, leases[st.req], st.n, b.now())
					if err == nil {
						d.State, err = b.l.State(ctx, "c", lim, b.now())
					}
				}
				if err != nil {
					t.Fatalf("step %d, %s: %v", i+1, st.op, err)
				}
				if d.Reason != st.want || counts(d.State) != st.state || leases[st.req].Reserved != st.reserved {
					t.Errorf("step %d, %s #%d %d: %v %v reserved %d, want %v %v reserved %d",
						i+1, st.op, st.req, st.n, d.Reason, counts(d.State), leases[st.req].Reserved, st.want, st.state, st.reserved)
				}
			}
		})
	}
}

func TestRedisReserveSettleReplacesReservation(t *testing.T) {
	s := redistest.Start(t)
	r := newTestRedis(t, newRedisClient(t, s), "resettle:")
	ctx := t.Context()
	lim := &Limits{Tokens: Rate{N: 1000, Window: 1000 * time.Hour}, Quota: Quota{N: 5000, Period: Month}, Concurrent: 1}
	d, _ := r.Admit(ctx, "c", lim, 200, time.Now())
	d, err := r.Reserve(ctx, "c", lim, d.Lease, 300, time.Now())
	if err != nil || d.Reason != Admitted || d.TokensRemaining != 500 || d.QuotaUsed != 500 || d.Lease.Reserved != 500 {
		t.Fatalf("after 200 admitted and 300 reserved: %+v %v, want 500 reserved", d, err)
	}
	if err := r.Settle(ctx, "c", lim, d.Lease, 50, time.Now()); err != nil {
		t.Fatal(err)
	}
	if st, _ := r.State(ctx, "c", lim, time.Now()); st.TokensRemaining != 950 || st.QuotaUsed != 50 || st.InFlight != 0 {
		t.Errorf("after settling 50: %+v, want 950 left, quota 50, none in flight", st)
	}
}

func TestRedisReserveLease(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	ctx := t.Context()
	lim := &Limits{Tokens: Rate{N: 1000, Window: 1000 * time.Hour}, Quota: Quota{N: 5000, Period: Day}}

	t.Run("settled: gone, nothing written", func(t *testing.T) {
		r := newTestRedis(t, c, "gone:")
		d, _ := r.Admit(ctx, "c", lim, 0, time.Now())
		lease := d.Lease
		if err := r.Settle(ctx, "c", lim, lease, 10, time.Now()); err != nil {
			t.Fatal(err)
		}
		keys := snapshot(t, c, "gone:")
		d, err := r.Reserve(ctx, "c", lim, lease, 100, time.Now())
		if !errors.Is(err, ErrLeaseGone) || d.Lease != lease {
			t.Errorf("reserve on a settled lease: %v lease %+v, want ErrLeaseGone and the lease unchanged (%+v)", err, d.Lease, lease)
		}
		if got := snapshot(t, c, "gone:"); !maps.Equal(got, keys) {
			t.Errorf("a reserve on a settled lease changed the keys:\n%v\n→\n%v", keys, got)
		}
	})

	t.Run("expired: reserved, and settled", func(t *testing.T) {
		// The instance that admitted it stopped renewing its lease.
		dead := newShortRedis(t, c, "late:", 200*time.Millisecond, keepEnded)
		d, _ := dead.Admit(ctx, "c", lim, 0, time.Now())
		dead.Close()
		time.Sleep(300 * time.Millisecond)
		r := newTestRedis(t, c, "late:")
		d, err := r.Reserve(ctx, "c", lim, d.Lease, 100, time.Now())
		if err != nil || d.Reason != Admitted || d.TokensRemaining != 900 || d.InFlight != 0 || d.Lease.Reserved != 100 {
			t.Fatalf("reserve past the lease's TTL: %+v %v, want admitted, 900 left, none in flight", d, err)
		}
		if err := r.Settle(ctx, "c", lim, d.Lease, 30, time.Now()); err != nil {
			t.Fatal(err)
		}
		if st, _ := r.State(ctx, "c", lim, time.Now()); st.TokensRemaining != 970 || st.QuotaUsed != 30 {
			t.Errorf("after settling 30: %+v, want 970 left and quota 30", st)
		}
	})

	t.Run("counted in the period of admission", func(t *testing.T) {
		r := newTestRedis(t, c, "yday:")
		now := redisNow(t, c)
		yesterday := now.AddDate(0, 0, -1)
		// A lease the way Admit names it, admitted yesterday: past its TTL.
		lease := Lease{ID: "7", Period: yesterday.UnixMilli()}
		d, err := r.Reserve(ctx, "c", lim, lease, 100, time.Now())
		if err != nil || d.Reason != Admitted || d.QuotaUsed != 0 || !d.QuotaReset.Equal(Day.End(now)) || d.Lease.Reserved != 100 {
			t.Fatalf("reserve: %+v %v, want admitted, with today's quota untouched", d, err)
		}
		key := "yday:quota:{c}:" + yesterday.UTC().Format(time.DateOnly)
		if got, _ := c.Get(ctx, key).Int64(); got != 100 {
			t.Errorf("%s holds %d, want 100", key, got)
		}
		within(t, key+" TTL", c.PTTL(ctx, key).Val(), Day.End(yesterday).Add(quotaGrace).Sub(now)+time.Millisecond, 2*time.Second)
		if err := r.Settle(ctx, "c", lim, d.Lease, 40, time.Now()); err != nil {
			t.Fatal(err)
		}
		if got, _ := c.Get(ctx, key).Int64(); got != 40 {
			t.Errorf("%s holds %d after settling 40, want 40", key, got)
		}
		if today := "yday:quota:{c}:" + now.UTC().Format(time.DateOnly); c.Exists(ctx, today).Val() != 0 {
			t.Errorf("today's counter %s exists", today)
		}
	})
}

func TestRedisSettleRepeatChangesNothing(t *testing.T) {
	s := redistest.Start(t)
	r := newTestRedis(t, newRedisClient(t, s), "repeat:")
	ctx := t.Context()
	lim := &Limits{Tokens: Rate{N: 1000, Window: 1000 * time.Hour}, Quota: Quota{N: 5000, Period: Day}}
	d, _ := r.Admit(ctx, "c", lim, 500, time.Now())
	for i := range 3 { // a retry after a timeout
		if err := r.Settle(ctx, "c", lim, d.Lease, 100, time.Now()); err != nil {
			t.Fatal(err)
		}
		st, _ := r.State(ctx, "c", lim, time.Now())
		if st.TokensRemaining != 900 || st.QuotaUsed != 100 || st.InFlight != 0 {
			t.Errorf("after settle #%d: %+v, want 900 left, quota 100, none in flight", i+1, st)
		}
	}
}

func TestRedisConcurrencyLeases(t *testing.T) {
	s := redistest.Start(t)
	ctx := t.Context()

	t.Run("held, refused, freed, across instances", func(t *testing.T) {
		a, b := newTestRedis(t, newRedisClient(t, s), "lease:"), newTestRedis(t, newRedisClient(t, s), "lease:")
		lim := &Limits{Concurrent: 3}
		var leases []Lease
		for i, r := range []*Redis{a, b, a} {
			d, err := r.Admit(ctx, "c", lim, 0, time.Now())
			if err != nil || d.Reason != Admitted || d.InFlight != i+1 {
				t.Fatalf("admit #%d: %+v %v, want admitted with %d in flight", i+1, d, err, i+1)
			}
			if d.Lease.ID == "" || slices.ContainsFunc(leases, func(l Lease) bool { return l.ID == d.Lease.ID }) {
				t.Fatalf("lease ID %q: want a new one", d.Lease.ID)
			}
			leases = append(leases, d.Lease)
		}
		for _, r := range []*Redis{a, b} {
			if d, _ := r.Admit(ctx, "c", lim, 0, time.Now()); d.Reason != ConcurrencyLimit || d.RetryAfter != time.Second {
				t.Errorf("fourth: %v retry %v, want concurrency retry 1s", d.Reason, d.RetryAfter)
			}
		}
		// A lease taken by one instance is freed by another.
		if err := b.Settle(ctx, "c", lim, leases[0], 0, time.Now()); err != nil {
			t.Fatal(err)
		}
		if d, _ := b.Admit(ctx, "c", lim, 0, time.Now()); d.Reason != Admitted || d.InFlight != 3 {
			t.Errorf("after a settle: %+v, want admitted with 3 in flight", d)
		}
	})

	t.Run("an expired lease is not counted, and still settles", func(t *testing.T) {
		// The instance that admitted them died: nothing renews their leases.
		dead := newShortRedis(t, newRedisClient(t, s), "expire:", 200*time.Millisecond, keepEnded)
		lim := &Limits{Concurrent: 2, Tokens: Rate{N: 1000, Window: 1000 * time.Hour}}
		first, _ := dead.Admit(ctx, "c", lim, 100, time.Now())
		dead.Admit(ctx, "c", lim, 0, time.Now())
		if d, _ := dead.Admit(ctx, "c", lim, 0, time.Now()); d.Reason != ConcurrencyLimit {
			t.Fatalf("third: %v, want concurrency", d.Reason)
		}
		dead.Close()
		time.Sleep(300 * time.Millisecond)
		r := newTestRedis(t, newRedisClient(t, s), "expire:")
		if st, _ := r.State(ctx, "c", lim, time.Now()); st.InFlight != 0 {
			t.Errorf("after the TTL: %d in flight, want 0", st.InFlight)
		}
		if d, _ := r.Admit(ctx, "c", lim, 0, time.Now()); d.Reason != Admitted || d.InFlight != 1 {
			t.Errorf("after the TTL: %+v, want admitted with 1 in flight", d)
		}
		// The request outlived its lease; what it used is charged all the same.
		if err := r.Settle(ctx, "c", lim, first.Lease, 300, time.Now()); err != nil {
			t.Fatal(err)
		}
		if st, _ := r.State(ctx, "c", lim, time.Now()); st.TokensRemaining != 700 || st.InFlight != 1 {
			t.Errorf("after settling 300 of 100 past the TTL: %+v, want 700 left and 1 in flight", st)
		}
	})
}

func TestRedisQuotaKeys(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	r := newTestRedis(t, c, "quota:")
	ctx := t.Context()
	for _, tc := range []struct {
		period Period
		layout string
	}{{Day, "2006-01-02"}, {Month, "2006-01"}} {
		t.Run(tc.period.String(), func(t *testing.T) {
			lim := &Limits{Quota: Quota{N: 1000, Period: tc.period}}
			client := "c-" + tc.period.String()
			now := redisNow(t, c)
			d, err := r.Admit(ctx, client, lim, 40, time.Now())
			if err != nil || d.Reason != Admitted || d.QuotaUsed != 40 || !d.QuotaReset.Equal(tc.period.End(now)) {
				t.Fatalf("admit: %+v %v, want admitted with 40 used until %v", d, err, tc.period.End(now))
			}
			key := "quota:quota:{" + client + "}:" + now.UTC().Format(tc.layout)
			if got, _ := c.Get(ctx, key).Int64(); got != 40 {
				t.Errorf("%s holds %d, want 40", key, got)
			}
			ttl := c.PTTL(ctx, key).Val()
			within(t, key+" TTL", ttl, tc.period.End(now).Add(quotaGrace).Sub(now)+time.Millisecond, 2*time.Second) // PTTL rounds
			if err := r.Settle(ctx, client, lim, d.Lease, 25, time.Now()); err != nil {
				t.Fatal(err)
			}
			st, err := r.State(ctx, client, lim, time.Now())
			if err != nil || st.QuotaUsed != 25 || !st.QuotaReset.Equal(tc.period.End(now)) {
				t.Errorf("state after settling 25: %+v %v, want 25 used until %v", st, err, tc.period.End(now))
			}
			if got, _ := c.Get(ctx, key).Int64(); got != 25 {
				t.Errorf("%s holds %d after settling 25, want 25", key, got)
			}
		})
	}

	t.Run("settled in the period of admission", func(t *testing.T) {
		lim := &Limits{Quota: Quota{N: 1000, Period: Day}}
		now := redisNow(t, c)
		for _, tc := range []struct {
			admitted time.Time
			counts   bool // its counter still lives
		}{
			{now.AddDate(0, 0, -1), true},
			{now.AddDate(0, 0, -3), false},
		} {
			// A lease the way Admit names it: nonce and unix ms of admission.
			lease := Lease{ID: "7", Period: tc.admitted.UnixMilli(), Reserved: 10}
			if err := r.Settle(ctx, "late", lim, lease, 50, time.Now()); err != nil {
				t.Fatal(err)
			}
			key := "quota:quota:{late}:" + tc.admitted.UTC().Format(time.DateOnly)
			got, err := c.Get(ctx, key).Int64()
			switch {
			case tc.counts && (err != nil || got != 40):
				t.Errorf("admitted %v: %s holds %d (%v), want the 40 beyond the reservation", tc.admitted, key, got, err)
			case !tc.counts && !errors.Is(err, redis.Nil):
				t.Errorf("admitted %v: %s holds %d (%v), want no counter past its grace", tc.admitted, key, got, err)
			}
		}
		today := "quota:quota:{late}:" + now.UTC().Format(time.DateOnly)
		if n := c.Exists(ctx, today).Val(); n != 0 {
			t.Errorf("today's counter %s exists: requests of earlier days count in theirs", today)
		}
	})
}

// TestRedisCalendar checks the scripts' UTC calendar against Period's, at
// the first and last second of every day of two centuries.
func TestRedisCalendar(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	first := time.Date(1999, 12, 1, 0, 0, 0, 0, time.UTC)
	last := time.Date(2201, 3, 1, 0, 0, 0, 0, time.UTC)
	script := luaLib + `
local out = {}
for day = tonumber(ARGV[10]), tonumber(ARGV[11]) do
  for _, sec in ipairs({day * 86400, day * 86400 + 86399}) do
    for kind = 1, 2 do
      local name, e = period(sec, kind)
      out[#out + 1] = name
      out[#out + 1] = e
    end
  end
end
return out`
	args := limitArgs(nil, &Limits{})
	args = append(args, first.Unix()/86400, last.Unix()/86400)
	vals, err := c.Eval(t.Context(), script, []string{"k", "k", "k"}, args...).Slice()
	if err != nil {
		t.Fatal(err)
	}
	i := 0
	for day := first; !day.After(last); day = day.AddDate(0, 0, 1) {
		for _, at := range []time.Time{day, day.Add(24*time.Hour - time.Second)} {
			for _, p := range []struct {
				period Period
				layout string
			}{{Day, "2006-01-02"}, {Month, "2006-01"}} {
				wantName, wantEnd := at.Format(p.layout), p.period.End(at).Unix()
				if i+1 >= len(vals) {
					t.Fatalf("reply of %d values ends at %v", len(vals), at)
				}
				if vals[i] != wantName || vals[i+1] != wantEnd {
					t.Fatalf("%s of %v: got %v ending %v, want %s ending %d", p.period, at, vals[i], vals[i+1], wantName, wantEnd)
				}
				i += 2
			}
		}
	}
	if i != len(vals) {
		t.Errorf("reply of %d values, checked %d", len(vals), i)
	}
}

func TestRedisIdleKeysExpire(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	r := newShortRedis(t, c, "idle:", 90*time.Millisecond, 100*time.Millisecond)
	ctx := t.Context()
	lim := &Limits{
		Requests: Rate{N: 10, Window: time.Second}, Tokens: Rate{N: 1000, Window: time.Minute},
		Concurrent: 5, Quota: Quota{N: 5000, Period: Day},
	}
	d, err := r.Admit(ctx, "c", lim, 500, time.Now())
	if err != nil || d.Reason != Admitted {
		t.Fatalf("admit: %v %v", d.Reason, err)
	}
	for key, want := range map[string]time.Duration{
		"idle:bucket:{c}": 30 * time.Second, // 500 of 1000/min; 1 of 10/s is full sooner
		"idle:lease:{c}":  90 * time.Millisecond,
	} {
		within(t, key+" PTTL", c.PTTL(ctx, key).Val(), want, 50*time.Millisecond)
	}
	// A refund to nothing leaves a full tokens bucket: the buckets live as
	// long as the requests bucket needs. The set of the last lease goes
	// once its note of the lease's end was kept long enough.
	if err := r.Settle(ctx, "c", lim, d.Lease, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	within(t, "buckets PTTL after a refund", c.PTTL(ctx, "idle:bucket:{c}").Val(), 100*time.Millisecond, 50*time.Millisecond)
	time.Sleep(150 * time.Millisecond)
	quotaKey := "idle:quota:{c}:" + redisNow(t, c).UTC().Format(time.DateOnly)
	if keys := slices.Sorted(maps.Keys(snapshot(t, c, "idle:"))); !slices.Equal(keys, []string{quotaKey}) {
		t.Errorf("keys of an idle client: %v, want only its quota counter %s", keys, quotaKey)
	}
	st, err := r.State(ctx, "c", lim, time.Now())
	if err != nil || st.RequestsRemaining != 10 || st.TokensRemaining != 1000 || st.RequestsReset != 0 || st.TokensReset != 0 || st.InFlight != 0 {
		t.Errorf("state of an idle client: %+v %v, want full buckets and nothing in flight", st, err)
	}
	// State writes nothing, not even for a client never seen.
	if st, err := r.State(ctx, "new", lim, time.Now()); err != nil || st.RequestsRemaining != 10 || st.TokensRemaining != 1000 || st.QuotaUsed != 0 {
		t.Errorf("state of a new client: %+v %v, want full buckets and no quota used", st, err)
	}
	if keys := snapshot(t, c, "idle:*{new}"); len(keys) != 0 {
		t.Errorf("State of a new client wrote %v", keys)
	}
}

func TestRedisDown(t *testing.T) {
	s := redistest.Start(t)
	r := newTimedRedis(t, newRedisClient(t, s), "down:", 200*time.Millisecond)
	lim := &Limits{Requests: Rate{N: 100, Window: time.Minute}, Concurrent: 5}
	admit := func(what string) (Decision, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		d, err := r.Admit(ctx, "c", lim, 0, time.Now())
		took := time.Since(start)
		if took > 350*time.Millisecond {
			t.Errorf("%s: Admit took %v with a deadline of 200ms", what, took)
		}
		t.Logf("%s: %v in %v", what, err, took)
		return d, err
	}
	if d, err := admit("up"); err != nil || d.Reason != Admitted {
		t.Fatalf("up: %v %v, want admitted", d.Reason, err)
	}

	s.Kill(t)
	_, err := admit("killed")
	if err == nil || !strings.HasPrefix(err.Error(), "redis admit: ") {
		t.Errorf("killed: error %v, want a wrapped one", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if err := r.Settle(ctx, "c", lim, Lease{ID: "1", Period: 1}, 0, time.Now()); err == nil || !strings.HasPrefix(err.Error(), "redis settle: ") {
		t.Errorf("killed: Settle error %v, want a wrapped one", err)
	}
	if _, err := r.State(ctx, "c", lim, time.Now()); err == nil || !strings.HasPrefix(err.Error(), "redis state: ") {
		t.Errorf("killed: State error %v, want a wrapped one", err)
	}

	s.Restart(t) // empty: the scripts are loaded again
	if d, err := admit("restarted"); err != nil || d.Reason != Admitted || d.InFlight != 1 {
		t.Errorf("restarted: %+v %v, want admitted, alone in flight", d, err)
	}

	s.Pause(t)
	_, err = admit("paused")
	s.Resume(t)
	if err == nil {
		t.Error("paused: no error")
	}
	if d, err := admit("resumed"); err != nil || d.Reason != Admitted {
		t.Errorf("resumed: %v %v, want admitted", d.Reason, err)
	}
}

func TestRedisKeysShareHashTag(t *testing.T) {
	r := newTestRedis(t, nil, "vgt:lim:")
	got := r.keys("key_abc")
	want := []string{"vgt:lim:bucket:{key_abc}", "vgt:lim:lease:{key_abc}", "vgt:lim:quota:{key_abc}:", "vgt:lim:held:{key_abc}"}
	if !slices.Equal(got, want) {
		t.Errorf("keys: got %q, want %q", got, want)
	}
}

var benchLimits = &Limits{
	Requests: Rate{N: 600, Window: time.Minute}, Tokens: Rate{N: 400_000, Window: time.Minute},
	Concurrent: 20, Quota: Quota{N: 50_000_000, Period: Month},
}

// reportScriptTime reports the time Redis spent running scripts per
// operation: its CPU is what the instances of a fleet share.
func reportScriptTime(b *testing.B, c *redis.Client) {
	b.Helper()
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		b.Fatal(err)
	}
	var usec float64
	for line := range strings.Lines(info) {
		for _, cmd := range []string{"cmdstat_evalsha:", "cmdstat_eval:"} {
			if rest, ok := strings.CutPrefix(line, cmd); ok {
				for field := range strings.SplitSeq(strings.TrimSpace(rest), ",") {
					if v, ok := strings.CutPrefix(field, "usec="); ok {
						n, _ := strconv.ParseFloat(v, 64)
						usec += n
					}
				}
			}
		}
	}
	b.ReportMetric(usec*1000/float64(b.N), "redis-ns/op")
}

// benchRedis starts a redis-server for a benchmark, and returns the
// limiter on it, its client and 10,000 client names.
func benchRedis(b *testing.B) (*Redis, *redis.Client, []string) {
	rc := newRedisClient(b, redistest.Start(b))
	names := make([]string, 10_000)
	for i := range names {
		names[i] = "key_" + strconv.Itoa(i)
	}
	return newTestRedis(b, rc, "bench:"), rc, names
}

// BenchmarkRedisAdmitSettle measures one request's two round trips
// against a local redis-server, one at a time.
func BenchmarkRedisAdmitSettle(b *testing.B) {
	r, rc, names := benchRedis(b)
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c := names[i%len(names)]
		i++
		d, err := r.Admit(ctx, c, benchLimits, 100, time.Time{})
		if err != nil || d.Reason != Admitted {
			b.Fatal(d.Reason, err)
		}
		if err := r.Settle(ctx, c, benchLimits, d.Lease, 80, time.Time{}); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	reportScriptTime(b, rc)
}

// BenchmarkRedisAdmitSettleParallel is the same from many goroutines, as
// an instance under load calls it.
func BenchmarkRedisAdmitSettleParallel(b *testing.B) {
	r, rc, names := benchRedis(b)
	ctx := context.Background()
	var next atomic.Int64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1)) * 7919
		for pb.Next() {
			c := names[i%len(names)]
			i++
			d, err := r.Admit(ctx, c, benchLimits, 100, time.Time{})
			if err != nil || d.Reason != Admitted {
				b.Error(d.Reason, err)
				return
			}
			if err := r.Settle(ctx, c, benchLimits, d.Lease, 80, time.Time{}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	reportScriptTime(b, rc)
}

// BenchmarkRedisAdmitDeferredSettleParallel is BenchmarkRedisAdmitSettleParallel
// as the handler calls it: the settle deferred, sent with the next
// admissions' pipeline.
func BenchmarkRedisAdmitDeferredSettleParallel(b *testing.B) {
	r, rc, names := benchRedis(b)
	ctx := context.Background()
	var next atomic.Int64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1)) * 7919
		for pb.Next() {
			c := names[i%len(names)]
			i++
			d, err := r.Admit(ctx, c, benchLimits, 100, time.Time{})
			if err != nil || d.Reason != Admitted {
				b.Error(d.Reason, err)
				return
			}
			r.SettleDeferred(c, benchLimits, d.Lease, 80, time.Time{})
		}
	})
	b.StopTimer()
	r.Close() // sends the settles still queued, so that their time counts
	reportScriptTime(b, rc)
}

// newTestRedis returns a Redis limiter on c, closed when the test ends.
func newTestRedis(t testing.TB, c redis.UniversalClient, prefix string) *Redis {
	return newShortRedis(t, c, prefix, LeaseTTL, keepEnded)
}

// testTimeout bounds Redis' answers in the tests that do not time them:
// generous, for a busy machine.
const testTimeout = 2 * time.Second

// newTimedRedis is newTestRedis with the timeout of Redis' answers given.
func newTimedRedis(t testing.TB, c redis.UniversalClient, prefix string, timeout time.Duration) *Redis {
	r := newRedis(c, prefix, zap.NewNop(), timeout, LeaseTTL, keepEnded)
	t.Cleanup(r.Close)
	return r
}

// newShortRedis is newTestRedis with the lease TTL and keepEnded given.
func newShortRedis(t testing.TB, c redis.UniversalClient, prefix string, leaseTTL, keep time.Duration) *Redis {
	r := newRedis(c, prefix, zap.NewNop(), testTimeout, leaseTTL, keep)
	t.Cleanup(r.Close)
	return r
}

func TestRedisNoSlotReservesNothing(t *testing.T) {
	s := redistest.Start(t)
	testNoSlotReservesNothing(t, newTestRedis(t, newRedisClient(t, s), "noslot:"))
}
