package limiter

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap"
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
