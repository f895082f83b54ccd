package ledger

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// TestSlots checks that both stores keep the ledger's 5-minute rows,
// usage and refusals, written in the batch of the hourly ones, read
// them back for every client and for one, pending rows included, and
// that the hourly rows are the same uses summed by hour.
func TestSlots(t *testing.T) {
	for name, open := range hourStores {
		t.Run(name, func(t *testing.T) {
			l := New(nil)
			st := open(t)
			l.Attach(st)
			ctx := context.Background()
			// Two slots of one hour, and a slot 30 minutes later.
			hour := time.Now().UTC().Truncate(time.Hour).Add(-2 * time.Hour)
			a, b, c := hour.Add(time.Minute), hour.Add(7*time.Minute), hour.Add(37*time.Minute)
			l.Add("key_a", "m:1", a, Tokens{Prompt: 10, Completion: 5, Cost: 7})
			l.Add("key_a", "m:1", a.Add(3*time.Minute), Tokens{Prompt: 1})
			l.Add("key_a", "m:1", b, Tokens{Prompt: 2})
			l.Add("key:b", "m2", c, Tokens{Completion: 3})
			for _, r := range []struct {
				client, reason string
				at             time.Time
			}{{"key_a", "rate_limit_exceeded", a}, {"key_a", "rate_limit_exceeded", b}, {"key:b", "quota_exceeded", c}} {
				if err := l.Refuse(r.client, r.reason, r.at); err != nil {
					t.Fatal(err)
				}
			}
			if err := l.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			l.Add("key:b", "m2", c, Tokens{Completion: 1}) // pending, read too
			if err := l.Refuse("key:b", "quota_exceeded", c); err != nil {
				t.Fatal(err)
			}
			want := []store.UsageRow{
				{Client: "key_a", Day: store.Slot(a), Model: "m:1", Requests: 2, PromptTokens: 11, CompletionTokens: 5, Cost: 7},
				{Client: "key_a", Day: store.Slot(b), Model: "m:1", Requests: 1, PromptTokens: 2},
				{Client: "key:b", Day: store.Slot(c), Model: "m2", Requests: 2, CompletionTokens: 4},
			}
			got, err := l.Slots(ctx, "", hour)
			if err != nil || !slices.Equal(got, want) {
				t.Fatalf("every client: got %+v, %v\nwant %+v", got, err, want)
			}
			if got, err := l.Slots(ctx, "key_a", b); err != nil || !slices.Equal(got, want[1:2]) {
				t.Fatalf("key_a since its second slot: got %+v, %v, want %+v", got, err, want[1:2])
			}
			wantRefused := []store.RefusalRow{
				{Client: "key_a", Hour: store.Slot(a), Reason: "rate_limit_exceeded", Count: 1},
				{Client: "key_a", Hour: store.Slot(b), Reason: "rate_limit_exceeded", Count: 1},
				{Client: "key:b", Hour: store.Slot(c), Reason: "quota_exceeded", Count: 2},
			}
			if got, err := l.RefusalSlots(ctx, "", hour); err != nil || !slices.Equal(got, wantRefused) {
				t.Fatalf("refusals: got %+v, %v\nwant %+v", got, err, wantRefused)
			}
			if got, err := l.RefusalSlots(ctx, "key:b", hour); err != nil || !slices.Equal(got, wantRefused[2:]) {
				t.Fatalf("key:b's refusals: got %+v, %v, want %+v", got, err, wantRefused[2:])
			}
			if err := l.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			// Stored now, the same; and the hours are the slots summed.
			if got, err := l.Slots(ctx, "", hour); err != nil || !slices.Equal(got, want) {
				t.Fatalf("stored: got %+v, %v\nwant %+v", got, err, want)
			}
			hours, err := l.Hours(ctx, "", hour)
			wantHours := []store.UsageRow{ // ':' sorts before '_'
				{Client: "key:b", Day: store.Hour(hour), Model: "m2", Requests: 2, CompletionTokens: 4},
				{Client: "key_a", Day: store.Hour(hour), Model: "m:1", Requests: 3, PromptTokens: 13, CompletionTokens: 5, Cost: 7},
			}
			if err != nil || !slices.Equal(hours, wantHours) {
				t.Fatalf("hours: got %+v, %v\nwant %+v", hours, err, wantHours)
			}
			refusedHours, err := l.RefusalHours(ctx, "", hour)
			wantRefusedHours := []store.RefusalRow{
				{Client: "key:b", Hour: store.Hour(hour), Reason: "quota_exceeded", Count: 2},
				{Client: "key_a", Hour: store.Hour(hour), Reason: "rate_limit_exceeded", Count: 2},
			}
			if err != nil || !slices.Equal(refusedHours, wantRefusedHours) {
				t.Fatalf("refusals by hour: got %+v, %v\nwant %+v", refusedHours, err, wantRefusedHours)
			}
		})
	}
}

// TestSlotRetention checks that both stores forget the 5-minute rows
// after SlotRetention: SQLite deletes them on its next write, Redis
// lets their hash expire; and that Redis counts a retried batch's once.
func TestSlotRetention(t *testing.T) {
	ctx := t.Context()
	t.Run("sqlite", func(t *testing.T) {
		st, err := sqlite.Open(t.TempDir() + "/k.db")
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		now := time.Now()
		old, recent := store.Slot(now.Add(-store.SlotRetention-store.SlotStep)), store.Slot(now.Add(-store.SlotRetention+2*store.SlotStep))
		b := store.UsageBatch{Writer: "w", Seq: 1,
			Slots:        []store.UsageRow{{Client: "k", Day: old, Model: "m", Requests: 1}, {Client: "k", Day: recent, Model: "m", Requests: 1}},
			SlotRefusals: []store.RefusalRow{{Client: "k", Hour: old, Reason: "x", Count: 1}, {Client: "k", Hour: recent, Reason: "x", Count: 1}}}
		if err := st.AddUsage(ctx, b); err != nil {
			t.Fatal(err)
		}
		// The next write drops what is past retention.
		if err := st.AddUsage(ctx, store.UsageBatch{Writer: "w", Seq: 2, Slots: []store.UsageRow{{Client: "k", Day: store.Slot(now), Model: "m", Requests: 1}}}); err != nil {
			t.Fatal(err)
		}
		rows, err := st.UsageSlots(ctx, "", store.Slot(now.Add(-48*time.Hour)))
		if err != nil || len(rows) != 2 || rows[0].Day == old || rows[1].Day == old {
			t.Fatalf("usage: got %+v, %v, want the recent and the new slot", rows, err)
		}
		refusals, err := st.RefusalSlots(ctx, "", store.Slot(now.Add(-48*time.Hour)))
		if err != nil || len(refusals) != 1 || refusals[0].Hour != recent {
			t.Fatalf("refusals: got %+v, %v, want the recent one", refusals, err)
		}
	})
	t.Run("redis", func(t *testing.T) {
		st, srv := openRedisTemp(t)
		slot := store.Slot(time.Now())
		b := store.UsageBatch{Writer: "w", Seq: 1, Slots: []store.UsageRow{{Client: "k", Day: slot, Model: "m", Requests: 1}},
			SlotRefusals: []store.RefusalRow{{Client: "k", Hour: slot, Reason: "x", Count: 1}}}
		// A batch retried after its answer was lost counts once.
		for range 2 {
			if err := st.AddUsage(ctx, b); err != nil {
				t.Fatal(err)
			}
		}
		if ttl := redistest.Client(t, srv.URL).TTL(ctx, redisSlotPrefix+slot).Val(); ttl < store.SlotRetention-time.Minute || ttl > store.SlotRetention {
			t.Errorf("TTL of the slot = %v, want %v", ttl, store.SlotRetention)
		}
		rows, err := st.UsageSlots(ctx, "k", slot)
		if err != nil || len(rows) != 1 || rows[0].Requests != 1 {
			t.Errorf("usage: got %+v, %v, want 1 request", rows, err)
		}
		refusals, err := st.RefusalSlots(ctx, "k", slot)
		if err != nil || len(refusals) != 1 || refusals[0].Count != 1 {
			t.Errorf("refusals: got %+v, %v, want 1", refusals, err)
		}
	})
}

// TestSlotRowsRefused checks that a 5-minute row a store cannot keep
// is set aside and reported, and holds back nothing else of its batch.
func TestSlotRowsRefused(t *testing.T) {
	ctx := t.Context()
	for name, open := range hourStores {
		t.Run(name, func(t *testing.T) {
			st := open(t)
			slot := store.Slot(time.Now())
			bad := store.UsageRow{Client: "k", Day: "not a slot", Model: "m", Requests: 1}
			if name == "redis" {
				// Redis keeps any slot name; a field that is no integer
				// it cannot add to.
				srv := st.(*redisstore.Store)
				if err := srv.Client().HSet(ctx, redisSlotPrefix+slot, hourField("k")+"m\x00requests", "x").Err(); err != nil {
					t.Fatal(err)
				}
				bad.Day = slot
			}
			good := store.UsageRow{Client: "g", Day: slot, Model: "m", Requests: 1}
			err := st.AddUsage(ctx, store.UsageBatch{Writer: "w", Seq: 1, Slots: []store.UsageRow{bad, good}})
			var refused *store.RefusedError
			if !errors.As(err, &refused) || !slices.Equal(refused.Rows, []store.UsageRow{bad}) {
				t.Fatalf("got %v, want the bad slot row refused", err)
			}
			rows, err := st.(store.Backend).UsageSlots(ctx, "g", slot)
			if err != nil || !slices.Equal(rows, []store.UsageRow{good}) {
				t.Fatalf("the good row: got %+v, %v", rows, err)
			}
		})
	}
}

// BenchmarkLedgerFlushBuild is what a flush of the ledger costs, off the
// request path: 1,000 clients' rows by day and 5 minutes, summed by hour.
func BenchmarkLedgerFlushBuild(b *testing.B) {
	now := time.Now()
	for b.Loop() {
		l := New(nil)
		for i := range 1000 {
			l.Add("key_"+string(rune('a'+i%26))+string(rune('a'+i/26%26)), "m", now, Tokens{Prompt: 10})
		}
		slots := make([]store.UsageRow, 0, len(l.slots))
		for _, r := range l.slots {
			slots = append(slots, *r)
		}
		_ = usageRows.hours(slots)
	}
}

// downStore is a store whose writes fail while fail is set, and
// which keeps the batches it took; it reads back no rows.
type downStore struct {
	store.Backend // nil: the ledger uses only the usage methods below
	fail          bool
	batches       []store.UsageBatch
}

func (s *downStore) AddUsage(_ context.Context, b store.UsageBatch) error {
	if s.fail {
		return errors.New("the store is down")
	}
	s.batches = append(s.batches, b)
	return nil
}
func (*downStore) UsageSince(context.Context, string, string) ([]store.UsageRow, error) {
	return nil, nil
}
func (*downStore) UsageHours(context.Context, string, string) ([]store.UsageRow, error) {
	return nil, nil
}
func (*downStore) UsageSlots(context.Context, string, string) ([]store.UsageRow, error) {
	return nil, nil
}
func (*downStore) RefusalHours(context.Context, string, string) ([]store.RefusalRow, error) {
	return nil, nil
}
func (*downStore) RefusalSlots(context.Context, string, string) ([]store.RefusalRow, error) {
	return nil, nil
}

// TestLedgerFoldsSlotsWhileTheStoreFails checks that, while the store
// cannot be written, the pending 5-minute rows of older slots are folded
// into their hour: memory holds one row an hour for them, not twelve,
// the readers still see them by hour and no longer by 5 minutes, and
// once the store is back their hours are written whole.
func TestLedgerFoldsSlotsWhileTheStoreFails(t *testing.T) {
	ctx := t.Context()
	st := &downStore{fail: true}
	l := New(nil)
	l.Attach(st)
	now := time.Now()
	l.Add("key_a", "m", now, Tokens{Prompt: 1})
	if err := l.Flush(ctx); err == nil {
		t.Fatal("the first flush to a failing store succeeded")
	}
	// An hour of traffic, two hours ago, while the store is down; and
	// a use now.
	hour := now.UTC().Truncate(time.Hour).Add(-2 * time.Hour)
	for i := range 12 {
		at := hour.Add(time.Duration(i) * store.SlotStep)
		l.Add("key_a", "m", at, Tokens{Prompt: 10})
		if err := l.Refuse("key_a", "rate_limit_exceeded", at); err != nil {
			t.Fatal(err)
		}
	}
	l.Add("key_a", "m", now, Tokens{Prompt: 5})
	if len(l.slots) != 13 || len(l.refusals) != 12 {
		t.Fatalf("%d pending usage and %d refusal rows before a flush, want 13 and 12", len(l.slots), len(l.refusals))
	}
	if err := l.Flush(ctx); err == nil {
		t.Fatal("a flush to a failing store succeeded")
	}
	if len(l.slots) != 2 || len(l.refusals) != 1 {
		t.Fatalf("%d pending usage and %d refusal rows, want 2 and 1: the hour's folded, and now's slot", len(l.slots), len(l.refusals))
	}
	hours, err := l.Hours(ctx, "key_a", hour)
	if err != nil || len(hours) != 2 || hours[0].Day != store.Hour(hour) || hours[0].Requests != 12 || hours[0].PromptTokens != 120 {
		t.Fatalf("the hours: got %+v, %v, want 12 requests of 120 tokens at %s", hours, err, store.Hour(hour))
	}
	if slots, err := l.Slots(ctx, "key_a", hour); err != nil || len(slots) != 1 || slots[0].Day != store.Slot(now) || slots[0].Requests != 2 || slots[0].PromptTokens != 6 {
		t.Fatalf("the slots: got %+v, %v, want now's 2 requests (the unsure batch's and the pending one)", slots, err)
	}
	if refusals, err := l.RefusalHours(ctx, "key_a", hour); err != nil || len(refusals) != 1 || refusals[0].Count != 12 {
		t.Fatalf("the refusals by hour: got %+v, %v, want 12", refusals, err)
	}
	if refusals, err := l.RefusalSlots(ctx, "key_a", hour); err != nil || len(refusals) != 0 {
		t.Fatalf("the refusals by slot: got %+v, %v, want none: the folded are by hour only", refusals, err)
	}

	st.fail = false
	if err := l.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	var slotRequests, hourRequests, refusedByHour, refusedBySlot int64
	for _, b := range st.batches {
		for _, r := range b.Slots {
			if !store.IsSlot(r.Day) {
				t.Errorf("a slot row of %q", r.Day)
			}
			slotRequests += r.Requests
		}
		for _, r := range b.Hours {
			hourRequests += r.Requests
		}
		for _, r := range b.Refusals {
			refusedByHour += r.Count
		}
		for _, r := range b.SlotRefusals {
			refusedBySlot += r.Count
		}
	}
	if len(st.batches) != 2 || hourRequests != 14 || slotRequests != 2 || refusedByHour != 12 || refusedBySlot != 0 {
		t.Errorf("%d batches: %d requests by hour, %d by slot, %d refusals by hour, %d by slot; want 2 batches, 14, 2, 12, 0",
			len(st.batches), hourRequests, slotRequests, refusedByHour, refusedBySlot)
	}
}
