package limiter

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// slicesFrom lowers the burst that is sliced to minBurst for one test.
func slicesFrom(t *testing.T, minBurst int64) {
	old := sliceMinBurst
	sliceMinBurst = minBurst
	t.Cleanup(func() { sliceMinBurst = old })
}

// newSlicingRedis is newShortRedis with large buckets sliced, as
// NewRedis makes it.
func newSlicingRedis(t *testing.T, s *redistest.Server, prefix string, leaseTTL time.Duration) *Redis {
	r := newShortRedis(t, newRedisClient(t, s), prefix, leaseTTL, keepEnded)
	r.slicing.Store(true)
	return r
}

func TestSliceable(t *testing.T) {
	big := Rate{N: 1_000_000, Window: time.Minute}
	for _, tc := range []struct {
		name     string
		lim      Limits
		req, tok int64
		ok       bool
	}{
		{"no limits", Limits{}, 0, 0, true},
		{"large buckets", Limits{Requests: big, Tokens: Rate{N: 1e12, Window: time.Minute}}, 10_000, 1e10, true},
		{"large burst of a small rate", Limits{Tokens: Rate{N: 10, Window: time.Minute, Burst: 2_000_000}}, 0, 20_000, true},
		{"a small bucket", Limits{Requests: big, Tokens: Rate{N: 999_999, Window: time.Minute}}, 0, 0, false},
		{"a small burst", Limits{Requests: Rate{N: 1_000_000, Window: time.Minute, Burst: 10}}, 0, 0, false},
		{"a concurrency limit", Limits{Requests: big, Concurrent: 1000}, 0, 0, false},
		{"a quota", Limits{Requests: big, Quota: Quota{N: 1e12, Period: Month}}, 10_000, 1e10, true},
		{"a quota smaller than the token bucket", Limits{Tokens: Rate{N: 1e12, Window: time.Minute}, Quota: Quota{N: 1e9, Period: Day}}, 0, 1e7, true},
		{"a budget: a quota alone", Limits{Quota: Quota{N: 1e10, Period: Month}}, 0, 1e8, true},
		{"a small quota", Limits{Requests: big, Quota: Quota{N: 999_999, Period: Month}}, 0, 0, false},
		{"no slot", Limits{Requests: big, NoSlot: true}, 0, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, tok, ok := sliceable(&tc.lim)
			if req != tc.req || tok != tc.tok || ok != tc.ok {
				t.Errorf("sliceable: got %d, %d, %v; want %d, %d, %v", req, tok, ok, tc.req, tc.tok, tc.ok)
			}
		})
	}
}

// TestRedisSlicesNeverOverAdmit: two instances admitting from slices of
// one bucket admit no more than the bucket holds, and no less than it
// holds but for what their slices keep.
func TestRedisSlicesNeverOverAdmit(t *testing.T) {
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	fleet := [2]*Redis{newSlicingRedis(t, s, "over:", LeaseTTL), newSlicingRedis(t, s, "over:", LeaseTTL)}
	lim := &Limits{Requests: Rate{N: 1000, Window: 24 * time.Hour}} // slices of 10; no refill to speak of
	var admitted, fromSlices atomic.Int64
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				d, err := fleet[(g+i)%2].Admit(t.Context(), "c", lim, 0, time.Now())
				if err != nil {
					t.Error(err)
					return
				}
				if d.Reason == Admitted {
					admitted.Add(1)
					if d.Lease.ID == sliceID {
						fromSlices.Add(1)
					}
					fleet[(g+i)%2].SettleDeferred("c", lim, d.Lease, 0, time.Now())
				}
			}
		})
	}
	wg.Wait()
	// Each instance holds at most a slice and a half unused.
	if n := admitted.Load(); n > 1000 || n < 1000-2*15 {
		t.Errorf("admitted %d of 1600 on a burst of 1000 across two instances, want at most 1000 and at least %d", n, 1000-2*15)
	}
	if fromSlices.Load() < 500 {
		t.Errorf("%d of %d admitted from slices, want most", fromSlices.Load(), admitted.Load())
	}
	// What the slices held goes back on Close.
	fleet[0].Close()
	fleet[1].Close()
	check := newTestRedis(t, newRedisClient(t, s), "over:")
	st, err := check.State(t.Context(), "c", lim, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if want := 1000 - admitted.Load(); st.RequestsRemaining < want || st.RequestsRemaining > want+1 {
		t.Errorf("requests remaining after Close: %d, want %d: what the slices held comes back", st.RequestsRemaining, want)
	}
}

// TestRedisSlicedTokens: tokens reserved from a slice and settled to it
// count in Redis as what was used, once the slice is given back: on Close,
// or sliceTTL after the claim.
func TestRedisSlicedTokens(t *testing.T) {
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	check := newTestRedis(t, newRedisClient(t, s), "tokens:")
	lim := &Limits{Tokens: Rate{N: 10_000, Window: 24 * time.Hour}} // slices of 100
	remaining := func(what string, want int64) {
		t.Helper()
		st, err := check.State(t.Context(), "c", lim, time.Now())
		if err != nil || st.TokensRemaining < want || st.TokensRemaining > want+1 {
			t.Errorf("%s: %d tokens remaining (%v), want %d", what, st.TokensRemaining, err, want)
		}
	}
	for _, close := range []bool{true, false} {
		name := "given back sliceTTL after"
		if close {
			name = "given back on Close"
		}
		t.Run(name, func(t *testing.T) {
			check.client.Del(t.Context(), "tokens:bucket:{c}")
			r := newSlicingRedis(t, s, "tokens:", 600*time.Millisecond) // a tick every 200 ms
			used := int64(0)
			for i := range 30 {
				d, err := r.Admit(t.Context(), "c", lim, 0, time.Now())
				if err != nil || d.Reason != Admitted {
					t.Fatalf("admit: %v %v", d.Reason, err)
				}
				if d, err = r.Reserve(t.Context(), "c", lim, d.Lease, 8, time.Now()); err != nil || d.Reason != Admitted {
					t.Fatalf("reserve: %v %v", d.Reason, err)
				}
				// Less, then more than reserved: refunds and debts.
				u := int64(3 + i%2*7)
				used += u
				if i%3 == 0 {
					r.SettleDeferred("c", lim, d.Lease, u, time.Now())
				} else if err := r.Settle(t.Context(), "c", lim, d.Lease, u, time.Now()); err != nil {
					t.Fatal(err)
				}
			}
			if close {
				r.Close()
			} else {
				time.Sleep(sliceTTL + 500*time.Millisecond)
			}
			remaining("after "+strconv.Itoa(30)+" requests", 10_000-used)
		})
	}
}

// TestRedisSliceStateCountsTheSlice: the standing of a request admitted
// from a slice counts what the slice holds as the client's.
func TestRedisSliceStateCountsTheSlice(t *testing.T) {
	slicesFrom(t, 1000)
	s := redistest.Start(t)
	r := newSlicingRedis(t, s, "state:", LeaseTTL)
	lim := &Limits{Requests: Rate{N: 1000, Window: 24 * time.Hour}}
	for i := range 5 {
		d, err := r.Admit(context.Background(), "c", lim, 0, time.Now())
		if err != nil || d.Reason != Admitted {
			t.Fatalf("admit: %v %v", d.Reason, err)
		}
		if want := int64(1000 - 1 - i); d.RequestsRemaining < want || d.RequestsRemaining > want+1 {
			t.Errorf("request %d: %d requests remaining, want %d", i, d.RequestsRemaining, want)
		}
	}
}

// BenchmarkRedisAdmitSettleSliced is BenchmarkRedisAdmitDeferredSettleParallel
// for one client of a tier with large buckets, as make bench's chat
// workload calls it: most requests are decided from the instance's slices.
func BenchmarkRedisAdmitSettleSliced(b *testing.B) {
	r, rc, _ := benchRedis(b)
	r.slicing.Store(true)
	lim := &Limits{Requests: Rate{N: 1e9, Window: time.Minute}, Tokens: Rate{N: 1e12, Window: time.Minute}}
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			d, err := r.Admit(ctx, "c", lim, 0, time.Time{})
			if err != nil || d.Reason != Admitted {
				b.Error(d.Reason, err)
				return
			}
			if d, err = r.Reserve(ctx, "c", lim, d.Lease, 100, time.Time{}); err != nil || d.Reason != Admitted {
				b.Error(d.Reason, err)
				return
			}
			r.SettleDeferred("c", lim, d.Lease, 80, time.Time{})
		}
	})
	b.StopTimer()
	r.Close()
	reportScriptTime(b, rc)
}
