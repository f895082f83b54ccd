package limiter

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// flaky is a shared backend that fails while down is set: at once, or,
// with hang, when the call's context ends, as a stopped Redis does.
type flaky struct {
	*Memory
	down, hang bool
	calls      int
}

func (f *flaky) fail(ctx context.Context) error {
	if f.hang {
		<-ctx.Done()
		return ctx.Err()
	}
	return errors.New("connection refused")
}

func (f *flaky) Admit(ctx context.Context, client string, lim *Limits, reserve int64, now time.Time) (Decision, error) {
	f.calls++
	if f.down {
		return Decision{}, f.fail(ctx)
	}
	d, err := f.Memory.Admit(ctx, client, lim, reserve, now)
	d.Lease.ID = "shared"
	return d, err
}

func (f *flaky) Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, now time.Time) (Decision, error) {
	f.calls++
	if f.down {
		return Decision{Lease: lease}, f.fail(ctx)
	}
	return f.Memory.Reserve(ctx, client, lim, lease, tokens, now)
}

func (f *flaky) State(ctx context.Context, client string, lim *Limits, now time.Time) (State, error) {
	f.calls++
	if f.down {
		return State{}, f.fail(ctx)
	}
	return f.Memory.State(ctx, client, lim, now)
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

// TestFallbackQuotaDuringOutage: while the shared backend fails, a quota
// tier is decided locally within the timeout, from the last figure the
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
			f := NewFallback(shared, NewMemory(failingLedger{hang: tc.hang}, 100), UseLocal, timeout, zap.NewNop())
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
			shared.down, shared.hang = true, tc.hang
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

			// Back up: the shared figure rules, though it never learnt of
			// the 1,000 served locally.
			shared.down, shared.hang = false, false
			back := t0.Add(probeEvery)
			if d := request("back up", 0, 0, back); d.Reason != Admitted || d.QuotaUsed != 9_000 || d.Lease.ID != "shared" {
				t.Errorf("back up: %+v, want the shared backend's 9,000", d)
			}
			shared.down, shared.hang = true, tc.hang
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
			f := NewFallback(&flaky{Memory: NewMemory(nil, 2*len(names))}, NewMemory(nil, 2*len(names)), UseLocal, time.Second, zap.NewNop())
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
