package limiter

import (
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// TestRedisLostCallsLeaveNothingCharged: a Reserve that Redis ran but
// whose answer the instance never got (it refused the request, or decided
// it without Redis) is given back by the lease's Settle, and an admission
// in the same case by its cancellation: a refused request leaves nothing
// charged in the quota or the buckets.
func TestRedisLostCallsLeaveNothingCharged(t *testing.T) {
	s := redistest.Start(t)
	c := newRedisClient(t, s)
	r := newShortRedis(t, c, "lost:", 3*time.Second, keepEnded) // retries every second
	lim := &Limits{Requests: Rate{N: 10, Window: time.Hour}, Tokens: Rate{N: 10_000, Window: time.Hour}, Quota: Quota{N: 100_000, Period: Day}}
	ctx := t.Context()

	d, err := r.Admit(ctx, "c", lim, 0, time.Now())
	if err != nil || d.Reason != Admitted {
		t.Fatal(d, err)
	}
	// The Reserve ran; its answer was lost: the lease is as it was.
	args := limitArgs(nil, lim)
	args = append(args, 500, d.Lease.Reserved, d.Lease.ID, d.Lease.Period)
	if err := reserveScript.Run(ctx, c, r.keys("c"), args...).Err(); err != nil {
		t.Fatal(err)
	}
	if err := r.Settle(ctx, "c", lim, d.Lease, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	st, _ := r.State(ctx, "c", lim, time.Now())
	if st.QuotaUsed != 0 || st.TokensRemaining != 10_000 {
		t.Errorf("a refused request whose lost Reserve ran: quota %d, %d tokens left; want 0 and 10,000", st.QuotaUsed, st.TokensRemaining)
	}

	// An admission that ran, whose answer was lost, is cancelled.
	args = limitArgs(nil, lim)
	args = append(args, 300, r.leaseTTL.Milliseconds(), "lost-admit", 0)
	if err := admitScript.Run(ctx, c, r.keys("c"), args...).Err(); err != nil {
		t.Fatal(err)
	}
	r.cancelLater("c", lim, "lost-admit")
	settledWithin(t, r, lim, func(st State) bool {
		return st.QuotaUsed == 0 && st.TokensRemaining == 10_000 && st.RequestsRemaining == 9 && st.InFlight == 0
	}, "the lost admission given back: its reservation and its request")
}

// TestRedisSliceDebtReachesRedisFirst: requests that use ten times what
// they reserved, admitted by two instances that slice a client's bucket,
// never pass its burst: what a request used beyond its slice reaches Redis
// in the settle that refunds its reservation there, not at the give-back.
func TestRedisSliceDebtReachesRedisFirst(t *testing.T) {
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	a, b := newSlicingRedis(t, s, "debt:", LeaseTTL), newSlicingRedis(t, s, "debt:", LeaseTTL)
	lim := &Limits{Tokens: Rate{N: 1000, Window: time.Hour}}
	ctx := t.Context()
	admitted, refusals := 0, 0
	for i := 0; refusals < 10 && i < 200; i++ {
		r := a
		if i%2 == 1 {
			r = b
		}
		d, err := r.Admit(ctx, "c", lim, 0, time.Now())
		if err == nil && d.Reason == Admitted {
			d, err = r.Reserve(ctx, "c", lim, d.Lease, 5, time.Now())
		}
		if err != nil {
			t.Fatal(err)
		}
		if d.Reason != Admitted {
			refusals++
			r.Settle(ctx, "c", lim, d.Lease, 0, time.Now())
			continue
		}
		admitted++
		r.Settle(ctx, "c", lim, d.Lease, 50, time.Now())
	}
	// 1,000 tokens hold 20 such requests, and the last may go into debt.
	if admitted > 21 {
		t.Errorf("%d requests of 50 tokens admitted on a burst of 1,000, want at most 21", admitted)
	}
	t.Logf("%d requests of 50 tokens admitted on a burst of 1,000", admitted)
}
