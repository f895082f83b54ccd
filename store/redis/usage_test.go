package redis

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// TestRedisLedgerChecksBeforeItWrites: a writer's key of another type is
// replaced, a row whose field holds what HINCRBY cannot add to is refused
// alone, and a sum past int64 stops at its largest.
func TestRedisLedgerChecksBeforeItWrites(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	raw := redistest.Client(t, srv.URL)
	day := "2030-03-01"
	k := usageKey("key_a", day)
	if err := raw.HSet(ctx, redisWriterPrefix+"w", "not", "a sequence").Err(); err != nil {
		t.Fatal(err)
	}
	if err := raw.HSet(ctx, k, "broken\x00prompt", "1.5", "full\x00prompt", math.MaxInt64-1).Err(); err != nil {
		t.Fatal(err)
	}
	rows := []store.UsageRow{
		{Client: "key_a", Day: day, Model: "broken", Requests: 1, PromptTokens: 5},
		{Client: "key_a", Day: day, Model: "full", Requests: 1, PromptTokens: 5},
		{Client: "key_a", Day: day, Model: "fine", Requests: 1, PromptTokens: 5, CachedTokens: 2},
	}
	err := st.AddUsage(ctx, store.UsageBatch{Writer: "w", Seq: 1, Rows: rows})
	var refused *store.RefusedError
	if !errors.As(err, &refused) || len(refused.Rows) != 1 || refused.Rows[0] != rows[0] {
		t.Fatalf("AddUsage = %v, want the broken row refused", err)
	}
	raw.HDel(ctx, k, "broken\x00prompt") // which no read takes either
	want := []store.UsageRow{
		{Client: "key_a", Day: day, Model: "fine", Requests: 1, PromptTokens: 5, CachedTokens: 2},
		{Client: "key_a", Day: day, Model: "full", Requests: 1, PromptTokens: math.MaxInt64},
	}
	if got, err := st.usageSince(ctx, "key_a", day, time.Date(2030, 3, 1, 12, 0, 0, 0, time.UTC)); err != nil || !slices.Equal(got, want) {
		t.Errorf("stored %+v (%v), want %+v", got, err, want)
	}
	if seq := raw.Get(ctx, redisWriterPrefix+"w").Val(); seq != "1" {
		t.Errorf("the writer's sequence is %q, want 1", seq)
	}
}

// TestRedisRefusalsOnce checks that a retried batch's refusals are
// counted once, that they expire with the hour's usage, and that a count
// saturates.
func TestRedisRefusalsOnce(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	hour := store.Hour(time.Now())
	b := store.UsageBatch{Writer: "w1", Seq: 1, Refusals: []store.RefusalRow{
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
	slices.SortFunc(got, func(a, b store.RefusalRow) int { return strings.Compare(a.Client, b.Client) })
	want := []store.RefusalRow{
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
	if ttl := redistest.Client(t, srv.URL).TTL(ctx, redisHourPrefix+hour).Val(); ttl < store.HourRetention-time.Minute || ttl > store.HourRetention {
		t.Errorf("TTL of the hour = %v, want %v", ttl, store.HourRetention)
	}
}

// TestRedisRefusalsRefused checks that a refusal field that is not an
// integer is set aside, reported as a refusal row, and holds back
// nothing else of the batch.
func TestRedisRefusalsRefused(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	hour := store.Hour(time.Now())
	raw := redistest.Client(t, srv.URL)
	if err := raw.HSet(ctx, redisHourPrefix+hour, refusalField("key_a", "bad"), "x").Err(); err != nil {
		t.Fatal(err)
	}
	bad := store.RefusalRow{Client: "key_a", Hour: hour, Reason: "bad", Count: 1}
	good := store.RefusalRow{Client: "key_b", Hour: "2030-01-01T00", Reason: "good", Count: 1}
	err := st.AddUsage(ctx, store.UsageBatch{Writer: "w", Seq: 1,
		Rows:     []store.UsageRow{{Client: "key_a", Day: store.Day(time.Now()), Model: "m", Requests: 1}},
		Refusals: []store.RefusalRow{good, bad}})
	var refused *store.RefusedError
	if !errors.As(err, &refused) || len(refused.Rows) != 0 || !slices.Equal(refused.Refusals, []store.RefusalRow{bad}) {
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

func TestSplitHourField(t *testing.T) {
	c, m, f, ok := splitHourField(hourField("key:\x00x") + "a\x00b\x00cost")
	if !ok || c != "key:\x00x" || m != "a\x00b" || f != "cost" {
		t.Fatalf("got %q %q %q %v", c, m, f, ok)
	}
	if _, _, _, ok := splitHourField("99:ab\x00cost"); ok {
		t.Fatal("a length past the field was read")
	}
}
