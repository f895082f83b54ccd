package admission

import (
	"context"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/limiter"
)

// claimAll wins every claim and counts them.
type claimAll struct{ claims chan string }

func (c claimAll) Claim(_ context.Context, id string, _ time.Time) (bool, error) {
	c.claims <- id
	return true, nil
}

// TestNoteQuota: the figure noted after settlement is the
// decision's, less the reservation, plus what was used; a quota
// refusal below the limit crosses no threshold, and is noted as a
// refusal of its own, once; and on the request path, below a threshold
// or past one already noted, noting costs no allocation.
func TestNoteQuota(t *testing.T) {
	c := claimAll{claims: make(chan string, 10)}
	n, err := alerts.NewNotifier(alerts.Config{Thresholds: []int{80, 100}, Claimer: c})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	h := &Admitter{Notifier: n}
	lim := &limiter.Limits{Quota: limiter.Quota{N: 1000, Period: limiter.Day}}
	client := caller.Client{ID: "key_a", Name: "a", Tier: "metered"}
	reset := time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC)
	decision := func(used, reserved int64, reason limiter.Reason) *limiter.Decision {
		return &limiter.Decision{Reason: reason, Lease: limiter.Lease{Reserved: reserved},
			State: limiter.State{QuotaUsed: used, QuotaReset: reset}}
	}
	wantClaims := func(want ...string) {
		t.Helper()
		for _, id := range want {
			select {
			case got := <-c.claims:
				if got != id {
					t.Errorf("claimed %s, want %s", got, id)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("no claim of %s", id)
			}
		}
		select {
		case got := <-c.claims:
			t.Errorf("claimed %s, want no more", got)
		case <-time.After(20 * time.Millisecond):
		}
	}

	below := decision(850, 100, limiter.Admitted) // 750 before it, 790 after using 40
	if allocs := testing.AllocsPerRun(100, func() { h.noteSide(alerts.Quota, client, lim, below, 40) }); allocs != 0 {
		t.Errorf("below the thresholds: %v allocations, want 0", allocs)
	}
	wantClaims()
	h.noteSide(alerts.Quota, client, lim, decision(850, 100, limiter.Admitted), 50) // 800
	wantClaims("quota|key_a|80|2026-12-01")
	past := decision(900, 50, limiter.Admitted)
	if allocs := testing.AllocsPerRun(100, func() { h.noteSide(alerts.Quota, client, lim, past, 10) }); allocs != 0 {
		t.Errorf("past a noted threshold: %v allocations, want 0", allocs)
	}
	refused := decision(960, 0, limiter.QuotaLimit)
	h.noteSide(alerts.Quota, client, lim, refused, 0)
	h.noteRefused(alerts.Quota, client, lim, decision(0, 0, limiter.TokenLimit), 50) // not a quota's
	wantClaims()
	h.noteRefused(alerts.Quota, client, lim, refused, 50)
	wantClaims("quota_refused|key_a|0|2026-12-01")
	if allocs := testing.AllocsPerRun(100, func() { h.noteRefused(alerts.Quota, client, lim, refused, 50) }); allocs != 0 {
		t.Errorf("a refusal already noted: %v allocations, want 0", allocs)
	}
	h.noteSide(alerts.Quota, client, lim, decision(1000, 40, limiter.Admitted), 40) // 1000: use crosses 100%
	wantClaims("quota|key_a|100|2026-12-01")
}
