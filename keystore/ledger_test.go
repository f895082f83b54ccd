package keystore

import (
	"context"
	"errors"
	"maps"
	"slices"
	"testing"
	"time"
)

// lostAnswers is a usage store that applies a write and then, as a
// broken connection would, answers with an error, as many times as told.
type lostAnswers struct {
	failures int
	applied  map[string]uint64 // the last sequence applied, by writer
	batches  []UsageBatch      // every write it was asked for
	rows     []UsageRow        // what it holds
}

func (s *lostAnswers) AddUsage(_ context.Context, b UsageBatch) error {
	s.batches = append(s.batches, b)
	if b.Seq > s.applied[b.Writer] {
		s.applied[b.Writer] = b.Seq
		s.rows = append(s.rows, b.Rows...)
	}
	if s.failures > 0 {
		s.failures--
		return errors.New("connection reset")
	}
	return nil
}

func (s *lostAnswers) UsageSince(context.Context, string, string) ([]UsageRow, error) {
	return slices.Clone(s.rows), nil // as a real store, rows of the caller's own
}

func TestLedgerWritesAFailedBatchAgainAsItWas(t *testing.T) {
	ctx := t.Context()
	st := &lostAnswers{failures: 2, applied: make(map[string]uint64)}
	l := newLedger()
	l.attach(st)
	now := time.Now()

	l.Add("key_a", "m", now, 10, 5)
	if err := l.flush(ctx); err == nil {
		t.Fatal("the first flush did not fail")
	}
	// Usage added meanwhile waits for a batch of its own.
	l.Add("key_a", "m", now, 1, 1)
	if err := l.flush(ctx); err == nil {
		t.Fatal("the second flush did not fail")
	}
	// The store holds the first batch once; the ledger counts it again
	// while unsure, never less.
	if used, _ := l.QuotaUsed(ctx, "key_a", now.Add(-time.Hour)); used < 17 {
		t.Errorf("quota used %d while a batch is unsure, want at least 17", used)
	}
	if err := l.flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.flush(ctx); err != nil {
		t.Fatal(err)
	}
	var requests, tokens int64
	for _, r := range st.rows {
		requests += r.Requests
		tokens += r.TotalTokens()
	}
	if requests != 2 || tokens != 17 {
		t.Errorf("the store holds %d requests and %d tokens, want 2 and 17: counted once each", requests, tokens)
	}
	var seqs []uint64
	for _, b := range st.batches {
		seqs = append(seqs, b.Seq)
		if b.Writer != l.writer {
			t.Errorf("batch of writer %q, want the ledger's %q", b.Writer, l.writer)
		}
	}
	// 1 lost; 1 again, lost; 1 again, then 2.
	if want := []uint64{1, 1, 1, 2}; !slices.Equal(seqs, want) {
		t.Errorf("batches written %v, want %v", seqs, want)
	}
	if used, _ := l.QuotaUsed(ctx, "key_a", now.Add(-time.Hour)); used != 17 {
		t.Errorf("quota used %d after every write, want 17", used)
	}
}

// TestLedgerDaysAroundMidnight checks that the day a use is counted on is
// its own UTC day, across midnight both ways, with the day's name kept
// between uses.
func TestLedgerDaysAroundMidnight(t *testing.T) {
	l := newLedger()
	midnight := time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC)
	for _, at := range []time.Time{
		midnight.Add(-time.Nanosecond), midnight, midnight.Add(time.Hour),
		midnight.Add(-time.Hour), midnight.Add(24*time.Hour - time.Nanosecond), midnight.Add(24 * time.Hour),
		midnight.In(time.FixedZone("UTC-5", -5*60*60)),
	} {
		l.Add("key_a", "m", at, 1, 0)
	}
	want := map[string]int64{"2026-11-25": 2, "2026-11-26": 4, "2026-11-27": 1}
	got := map[string]int64{}
	for k, row := range l.pending {
		got[k.day] += row.Requests
	}
	if !maps.Equal(got, want) {
		t.Fatalf("requests by day: %v, want %v", got, want)
	}
}
