package limiter

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// flaky is a shared backend that fails while down is set.
type flaky struct {
	*Memory
	down  bool
	calls int
}

func (f *flaky) Admit(ctx context.Context, client string, lim *Limits, reserve int64, now time.Time) (Decision, error) {
	f.calls++
	if f.down {
		return Decision{}, errors.New("connection refused")
	}
	d, err := f.Memory.Admit(ctx, client, lim, reserve, now)
	d.Lease.ID = "shared"
	return d, err
}

func (f *flaky) Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, now time.Time) (Decision, error) {
	f.calls++
	if f.down {
		return Decision{Lease: lease}, errors.New("connection refused")
	}
	return f.Memory.Reserve(ctx, client, lim, lease, tokens, now)
}

func TestFallback(t *testing.T) {
	ctx := context.Background()
	lim := &Limits{Requests: Rate{N: 1, Window: time.Hour}}
	for _, tc := range []struct {
		name   string
		policy OnError
	}{{"local", UseLocal}, {"deny", Deny}} {
		t.Run(tc.name, func(t *testing.T) {
			shared := &flaky{Memory: NewMemory(nil, 100)}
			var changes []bool
			f := NewFallback(shared, NewMemory(nil, 100), tc.policy, 50*time.Millisecond, zap.NewNop())
			f.OnChange = func(down bool) { changes = append(changes, down) }

			if d, err := f.Admit(ctx, "c", lim, 0, t0); err != nil || d.Lease.ID != "shared" {
				t.Fatalf("up: %+v %v, want the shared backend's decision", d, err)
			}
			shared.down = true
			d, err := f.Admit(ctx, "c", lim, 0, t0)
			switch tc.policy {
			case UseLocal:
				if err != nil || d.Reason != Admitted || d.Lease.ID != "" {
					t.Errorf("down, local: %+v %v, want a local admission", d, err)
				}
			case Deny:
				if !errors.Is(err, ErrUnavailable) {
					t.Errorf("down, deny: %v, want ErrUnavailable", err)
				}
			}
			// While down, the shared backend is left alone until the probe.
			calls := shared.calls
			f.Admit(ctx, "c", lim, 0, t0.Add(probeEvery/2))
			if shared.calls != calls {
				t.Error("the failed backend was asked again before the probe time")
			}
			shared.down = false
			if d, err := f.Admit(ctx, "d", lim, 0, t0.Add(probeEvery)); err != nil || d.Lease.ID != "shared" {
				t.Errorf("back up: %+v %v, want the shared backend again", d, err)
			}
			if len(changes) != 2 || !changes[0] || changes[1] {
				t.Errorf("changes %v, want [true false]", changes)
			}
		})
	}
}

func TestFallbackReserve(t *testing.T) {
	ctx := t.Context()
	lim := &Limits{Tokens: Rate{N: 1000, Window: time.Hour}}
	tokensLeft := func(t *testing.T, l Limiter) int64 {
		t.Helper()
		s, err := l.State(ctx, "c", lim, t0)
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
			local := NewMemory(nil, 100)
			f := NewFallback(shared, local, tc.policy, 50*time.Millisecond, zap.NewNop())

			d, _ := f.Admit(ctx, "c", lim, 0, t0)
			d, err := f.Reserve(ctx, "c", lim, d.Lease, 300, t0)
			lease := d.Lease
			if err != nil || d.Reason != Admitted || lease.Reserved != 300 || lease.ID != "shared" {
				t.Fatalf("up: %+v %v, want 300 reserved", d, err)
			}
			if shared, local := tokensLeft(t, shared), tokensLeft(t, local); shared != 700 || local != 1000 {
				t.Fatalf("up: %d tokens left in the shared backend and %d locally, want 700 and 1000", shared, local)
			}

			shared.down = true
			d, err = f.Reserve(ctx, "c", lim, lease, 100, t0)
			switch tc.policy {
			case UseLocal:
				// Unchecked, and the lease unchanged: Settle charges the
				// shared backend all the request used.
				if err != nil || d.Reason != Admitted || d.Lease != lease || d.TokensRemaining != 1000 {
					t.Errorf("down, local: %+v %v, want admitted unchecked, the lease as it was (%+v), the local state", d, err, lease)
				}
				calls := shared.calls
				if d, err := f.Reserve(ctx, "c", lim, lease, 701, t0); err != nil || d.Reason != TooLarge || d.RetryAfter != -1 || d.Lease != lease {
					t.Errorf("down, local, 300 + 701: %+v %v, want too large", d, err)
				}
				if shared.calls != calls {
					t.Error("the failed backend was asked again before the probe time")
				}
				if left := tokensLeft(t, local); left != 1000 {
					t.Errorf("down, local: %d tokens left locally, want 1000: a shared lease reserves nothing there", left)
				}
				// A lease of the local limits reserves there.
				d, _ := f.Admit(ctx, "c", lim, 0, t0)
				d, err = f.Reserve(ctx, "c", lim, d.Lease, 200, t0)
				ll := d.Lease
				if err != nil || d.Reason != Admitted || ll != (Lease{Reserved: 200}) || d.TokensRemaining != 800 {
					t.Errorf("down, local lease: %+v %v, want 200 reserved locally", d, err)
				}
				if shared.calls != calls {
					t.Error("a local lease went to the shared backend")
				}
				f.Settle(ctx, "c", lim, ll, 50, t0)
				if left := tokensLeft(t, local); left != 950 {
					t.Errorf("after settling the local lease: %d tokens left locally, want 950", left)
				}
			case Deny:
				if !errors.Is(err, ErrUnavailable) || d.Lease != lease {
					t.Errorf("down, deny: %+v %v, want ErrUnavailable and the lease as it was (%+v)", d, err, lease)
				}
			}

			shared.down = false
			if err := f.Settle(ctx, "c", lim, lease, 350, t0.Add(probeEvery)); err != nil {
				t.Fatal(err)
			}
			if left := tokensLeft(t, shared); left != 650 {
				t.Errorf("after settling 350: %d tokens left in the shared backend, want 650", left)
			}
		})
	}
	t.Run("negative", func(t *testing.T) {
		f := NewFallback(&flaky{Memory: NewMemory(nil, 100), down: true}, NewMemory(nil, 100), UseLocal, 50*time.Millisecond, zap.NewNop())
		if _, err := f.Reserve(ctx, "c", lim, Lease{ID: "shared"}, -1, t0); err == nil {
			t.Error("reserve -1: no error")
		}
	})
}

// TestFallbackReserveRedis: a lease Redis reports gone is the caller's
// error, not an outage; Redis killed is one.
func TestFallbackReserveRedis(t *testing.T) {
	s := redistest.Start(t)
	ctx := t.Context()
	lim := &Limits{Tokens: Rate{N: 1000, Window: time.Hour}, Concurrent: 2}
	f := NewFallback(newTestRedis(t, newRedisClient(t, s), "fallback:"), NewMemory(nil, 100), UseLocal, 200*time.Millisecond, zap.NewNop())

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
	d, err = f.Reserve(ctx, "c", lim, lease, 10, time.Now())
	if err != nil || d.Reason != Admitted || d.Lease != lease || !f.Down() {
		t.Errorf("Redis killed: %+v %v down %v, want admitted unchecked, the lease as it was (%+v), the fallback in force", d, err, f.Down(), lease)
	}
}
