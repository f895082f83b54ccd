package keystore

import (
	"context"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestRefusalHours checks that both stores keep the ledger's refusals by
// hour, read them back for every client and for one, leave the daily
// rows alone, and that the usage by hour does not read them as usage.
func TestRefusalHours(t *testing.T) {
	for name, open := range hourStores {
		t.Run(name, func(t *testing.T) {
			l := newLedger(nil)
			l.attach(open(t))
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
			if err := l.flush(ctx); err != nil {
				t.Fatal(err)
			}
			refuse("key:b", "rate_limit_exceeded", now, 1) // pending, read too
			refuse("key_a", "rate_limit_exceeded", earlier, 1)
			want := []RefusalRow{
				{Client: "key_a", Hour: Hour(earlier), Reason: "quota_exceeded", Count: 1},
				{Client: "key_a", Hour: Hour(earlier), Reason: "rate_limit_exceeded", Count: 4},
				{Client: "key:b", Hour: Hour(now), Reason: "rate_limit_exceeded", Count: 3},
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
			if err := l.flush(ctx); err != nil {
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
	l := newLedger(nil)
	for _, reason := range []string{"", "Rate_limit", "rate-limit", "rate limit", "x\x00y", string(make([]byte, 65))} {
		if err := l.Refuse("key_a", reason, time.Now()); !errors.Is(err, ErrInvalid) {
			t.Errorf("Refuse(%q) = %v, want ErrInvalid", reason, err)
		}
	}
	long := "a"
	for len(long) < maxReasonLen {
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
	l := newLedger(nil)
	now := time.Now()
	l.refusals[refusalKey{"key_a", Slot(now), "x"}] = math.MaxInt64
	if err := l.Refuse("key_a", "x", now); err != nil {
		t.Fatal(err)
	}
	if n := l.refusals[refusalKey{"key_a", Slot(now), "x"}]; n != math.MaxInt64 {
		t.Errorf("count = %d, want the largest int64", n)
	}
}

// TestRedisRefusalsOnce checks that a retried batch's refusals are
// counted once, that they expire with the hour's usage, and that a count
// saturates.
func TestRedisRefusalsOnce(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	hour := Hour(time.Now())
	b := UsageBatch{Writer: "w1", Seq: 1, Refusals: []RefusalRow{
		{Client: "key_a", Hour: hour, Reason: "rate_limit_exceeded", Count: 2},
		{Client: "key_a:x", Hour: hour, Reason: "quota_exceeded", Count: math.MaxInt64 - 1},
	}}
	for _, seq := range []uint64{1, 1, 2, 2} {
		b.Seq = seq
		if err := st.AddUsage(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	got, err := st.RefusalHours(ctx, "", hour)
	slices.SortFunc(got, func(a, b RefusalRow) int { return strings.Compare(a.Client, b.Client) })
	want := []RefusalRow{
		{Client: "key_a", Hour: hour, Reason: "rate_limit_exceeded", Count: 4},
		{Client: "key_a:x", Hour: hour, Reason: "quota_exceeded", Count: math.MaxInt64},
	}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("got %+v, %v\nwant %+v", got, err, want)
	}
	if got, err := st.RefusalHours(ctx, "key_a", hour); err != nil || !slices.Equal(got, want[:1]) {
		t.Fatalf("key_a: got %+v, %v, want %+v", got, err, want[:1])
	}
	if rows, err := st.UsageHours(ctx, "", hour); err != nil || len(rows) != 0 {
		t.Fatalf("usage by hour: got %+v, %v, want none", rows, err)
	}
	if ttl := rawRedis(t, srv.URL).TTL(ctx, redisHourPrefix+hour).Val(); ttl < HourRetention-time.Minute || ttl > HourRetention {
		t.Errorf("TTL of the hour = %v, want %v", ttl, HourRetention)
	}
}

// TestRedisRefusalsRefused checks that a refusal field that is not an
// integer is set aside, reported as a refusal row, and holds back
// nothing else of the batch.
func TestRedisRefusalsRefused(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	hour := Hour(time.Now())
	raw := rawRedis(t, srv.URL)
	if err := raw.HSet(ctx, redisHourPrefix+hour, refusalField("key_a", "bad"), "x").Err(); err != nil {
		t.Fatal(err)
	}
	bad := RefusalRow{Client: "key_a", Hour: hour, Reason: "bad", Count: 1}
	good := RefusalRow{Client: "key_b", Hour: "2030-01-01T00", Reason: "good", Count: 1}
	err := st.AddUsage(ctx, UsageBatch{Writer: "w", Seq: 1,
		Rows:     []UsageRow{{Client: "key_a", Day: Day(time.Now()), Model: "m", Requests: 1}},
		Refusals: []RefusalRow{good, bad}})
	var refused *RefusedError
	if !errors.As(err, &refused) || len(refused.Rows) != 0 || !slices.Equal(refused.Refusals, []RefusalRow{bad}) {
		t.Fatalf("got %v, want the bad refusal row refused", err)
	}
	if n := raw.HGet(ctx, redisHourPrefix+"2030-01-01T00", refusalField("key_b", "good")).Val(); n != "1" {
		t.Errorf("the good row holds %q, want 1", n)
	}
}

func TestSplitRefusalField(t *testing.T) {
	c, r, ok := splitRefusalField(refusalField("key:\x00x", "quota_exceeded"))
	if !ok || c != "key:\x00x" || r != "quota_exceeded" {
		t.Fatalf("got %q %q %v", c, r, ok)
	}
	for _, f := range []string{"99:ab", "refused\x0099:ab", hourField("key") + "m\x00requests"} {
		if _, _, ok := splitRefusalField(f); ok {
			t.Errorf("%q was read as a refusal", f)
		}
	}
	if _, _, _, ok := splitHourField(refusalField("key", "x")); ok {
		t.Error("a refusal was read as usage")
	}
}
