package ledger

import (
	"context"
	"errors"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// TestRefusalHours checks that both stores keep the ledger's refusals by
// hour, read them back for every client and for one, leave the daily
// rows alone, and that the usage by hour does not read them as usage.
func TestRefusalHours(t *testing.T) {
	for name, open := range hourStores {
		t.Run(name, func(t *testing.T) {
			l := New(nil)
			l.Attach(open(t))
			ctx := context.Background()
			now := time.Now().UTC()
			earlier := now.Add(-2 * time.Hour)
			refuse := func(client, reason string, at time.Time, n int) {
				t.Helper()
				for range n {
					if err := l.Refuse(client, reason, at); err != nil {
						t.Fatal(err)
					}
				}
			}
			refuse("key_a", "rate_limit_exceeded", earlier, 3)
			refuse("key_a", "quota_exceeded", earlier, 1)
			refuse("key:b", "rate_limit_exceeded", now, 2)
			l.Add("key_a", "m", earlier, Tokens{Prompt: 1})
			if err := l.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			refuse("key:b", "rate_limit_exceeded", now, 1) // pending, read too
			refuse("key_a", "rate_limit_exceeded", earlier, 1)
			want := []store.RefusalRow{
				{Client: "key_a", Hour: store.Hour(earlier), Reason: "quota_exceeded", Count: 1},
				{Client: "key_a", Hour: store.Hour(earlier), Reason: "rate_limit_exceeded", Count: 4},
				{Client: "key:b", Hour: store.Hour(now), Reason: "rate_limit_exceeded", Count: 3},
			}
			all, err := l.RefusalHours(ctx, "", now.Add(-24*time.Hour))
			if err != nil || !slices.Equal(all, want) {
				t.Fatalf("every client: got %+v, %v\nwant %+v", all, err, want)
			}
			one, err := l.RefusalHours(ctx, "key_a", now.Add(-24*time.Hour))
			if err != nil || !slices.Equal(one, want[:2]) {
				t.Fatalf("key_a: got %+v, %v, want %+v", one, err, want[:2])
			}
			if one, err := l.RefusalHours(ctx, "key_a", now.Add(-time.Hour)); err != nil || len(one) != 0 {
				t.Fatalf("key_a in the last hour: got %+v, %v, want none", one, err)
			}
			if err := l.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			if all, err := l.RefusalHours(ctx, "", now.Add(-24*time.Hour)); err != nil || !slices.Equal(all, want) {
				t.Fatalf("stored: got %+v, %v\nwant %+v", all, err, want)
			}
			hours, err := l.Hours(ctx, "", now.Add(-24*time.Hour))
			if err != nil || len(hours) != 1 || hours[0].Client != "key_a" || hours[0].Requests != 1 {
				t.Fatalf("the usage by hour: got %+v, %v, want key_a's one request", hours, err)
			}
			for _, c := range []string{"key_a", "key:b"} {
				if days, err := l.UsageSince(ctx, c, earlier); err != nil || len(days) > 1 || len(days) == 1 && days[0].Requests != 1 {
					t.Fatalf("the daily rows of %s: got %+v, %v, want the one request of key_a", c, days, err)
				}
			}
		})
	}
}

func TestRefuseChecksTheReason(t *testing.T) {
	l := New(nil)
	for _, reason := range []string{"", "Rate_limit", "rate-limit", "rate limit", "x\x00y", string(make([]byte, 65))} {
		if err := l.Refuse("key_a", reason, time.Now()); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("Refuse(%q) = %v, want ErrInvalid", reason, err)
		}
	}
	long := "a"
	for len(long) < store.MaxReasonLen {
		long += "_"
	}
	for _, reason := range []string{"rate_limit_exceeded", "model_not_found", "a0_9", long} {
		if err := l.Refuse("key_a", reason, time.Now()); err != nil {
			t.Errorf("Refuse(%q) = %v, want nil", reason, err)
		}
	}
	if len(l.refusals) != 4 {
		t.Errorf("%d pending refusal rows, want 4", len(l.refusals))
	}
}

func TestLedgerRefusalsSaturate(t *testing.T) {
	l := New(nil)
	now := time.Now()
	l.refusals[rowKey{"key_a", store.Slot(now), "x"}] = math.MaxInt64
	if err := l.Refuse("key_a", "x", now); err != nil {
		t.Fatal(err)
	}
	if n := l.refusals[rowKey{"key_a", store.Slot(now), "x"}]; n != math.MaxInt64 {
		t.Errorf("count = %d, want the largest int64", n)
	}
}
