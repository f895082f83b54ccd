package ledger

import (
	"context"
	"errors"
	"maps"
	"math"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/store"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// lostAnswers is a usage store that applies a write and then, as a
// broken connection would, answers with an error, as many times as told.
type lostAnswers struct {
	store.Backend // nil: the ledger uses only the usage methods below
	failures      int
	applied       map[string]uint64  // the last sequence applied, by writer
	batches       []store.UsageBatch // every write it was asked for
	rows          []store.UsageRow   // what it holds
}

func (s *lostAnswers) AddUsage(_ context.Context, b store.UsageBatch) error {
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

func (s *lostAnswers) UsageSince(context.Context, string, string) ([]store.UsageRow, error) {
	return slices.Clone(s.rows), nil // as a real store, rows of the caller's own
}

func TestLedgerWritesAFailedBatchAgainAsItWas(t *testing.T) {
	ctx := t.Context()
	st := &lostAnswers{failures: 2, applied: make(map[string]uint64)}
	l := New(zap.NewNop())
	l.Attach(st)
	now := time.Now()

	l.Add("key_a", "m", now, Tokens{Prompt: 10, Completion: 5})
	if err := l.Flush(ctx); err == nil {
		t.Fatal("the first flush did not fail")
	}
	// Usage added meanwhile waits for a batch of its own.
	l.Add("key_a", "m", now, Tokens{Prompt: 1, Completion: 1})
	if err := l.Flush(ctx); err == nil {
		t.Fatal("the second flush did not fail")
	}
	// The store holds the first batch once; the ledger counts it again
	// while unsure, never less.
	if used, _ := l.QuotaUsed(ctx, "key_a", now.Add(-time.Hour)); used < 17 {
		t.Errorf("quota used %d while a batch is unsure, want at least 17", used)
	}
	if err := l.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Flush(ctx); err != nil {
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
	l := New(zap.NewNop())
	midnight := time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC)
	for _, at := range []time.Time{
		midnight.Add(-time.Nanosecond), midnight, midnight.Add(time.Hour),
		midnight.Add(-time.Hour), midnight.Add(24*time.Hour - time.Nanosecond), midnight.Add(24 * time.Hour),
		midnight.In(time.FixedZone("UTC-5", -5*60*60)),
	} {
		l.Add("key_a", "m", at, Tokens{Prompt: 1})
	}
	want := map[string]int64{"2026-11-25": 2, "2026-11-26": 4, "2026-11-27": 1}
	got := map[string]int64{}
	for k, row := range l.pending {
		got[k.at] += row.Requests
	}
	if !maps.Equal(got, want) {
		t.Fatalf("requests by day: %v, want %v", got, want)
	}
}

// usageBackends open a new, empty usage store of each kind, closed at the
// end of the test, with a way to make the rows of one client unwritable
// there: a trigger that refuses them in SQLite, a string where their day's
// hash would be in Redis.
var usageBackends = []struct {
	name string
	open func(t *testing.T) (st store.Backend, spec string, breakClient func(client, day string))
}{
	{"sqlite", func(t *testing.T) (store.Backend, string, func(string, string)) {
		st, path := openTemp(t)
		return st, "sqlite:" + path, func(client, _ string) {
			_, err := st.DB().Exec(`CREATE TRIGGER refuse BEFORE INSERT ON usage WHEN NEW.client = '` + client + `'
				BEGIN SELECT RAISE(ABORT, 'refused by the test'); END`)
			if err != nil {
				t.Fatal(err)
			}
		}
	}},
	{"redis", func(t *testing.T) (store.Backend, string, func(string, string)) {
		st, srv := openRedisTemp(t)
		return st, srv.URL, func(client, day string) {
			if err := redistest.Client(t, srv.URL).Set(t.Context(), usageKey(client, day), "not a hash", 0).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}},
}

// ledgerOn is a new ledger writing to a new store that open makes.
func ledgerOn(t *testing.T, open func(*testing.T) (store.Backend, string, func(string, string))) (context.Context, store.Backend, *Ledger) {
	t.Helper()
	st, _, _ := open(t)
	l := New(zap.NewNop())
	l.Attach(st)
	return t.Context(), st, l
}

// TestLedgerSumsSaturate: counts too large to add stop at the largest
// int64, in memory, in the store and in what is read back, rather than
// wrapping negative (and starting a quota over) or failing every write.
func TestLedgerSumsSaturate(t *testing.T) {
	const huge = 9_000_000_000_000_000_000 // 9e18, as an upstream once reported
	for _, b := range usageBackends {
		t.Run(b.name, func(t *testing.T) {
			ctx, st, l := ledgerOn(t, b.open)
			now := time.Now()
			absurd := Tokens{Prompt: huge, Completion: 5, Cached: huge, Reasoning: 1, Cost: huge}
			l.Add("key_a", "m", now, absurd)
			l.Add("key_a", "m", now, absurd)
			if used, err := l.QuotaUsed(ctx, "key_a", now); err != nil || used != math.MaxInt64 {
				t.Errorf("quota used %d (%v) while pending, want the largest int64", used, err)
			}
			if spent, err := l.CostUsed(ctx, "key_a", now); err != nil || spent != math.MaxInt64 {
				t.Errorf("cost used %d (%v) while pending, want the largest int64", spent, err)
			}
			// Two batches of saturated rows, then one that the pending
			// rows add to when read.
			for range 2 {
				if err := l.Flush(ctx); err != nil {
					t.Fatalf("writing a saturated batch: %v", err)
				}
				l.Add("key_a", "m", now, absurd)
				l.Add("key_a", "m", now, absurd)
			}
			want := store.UsageRow{Client: "key_a", Day: store.Day(now), Model: "m", Requests: 4,
				PromptTokens: math.MaxInt64, CompletionTokens: 20, CachedTokens: math.MaxInt64, ReasoningTokens: 4, Cost: math.MaxInt64}
			if rows, err := st.UsageSince(ctx, "key_a", store.Day(now)); err != nil || len(rows) != 1 || rows[0] != want {
				t.Errorf("stored %+v (%v), want %+v", rows, err, want)
			}
			want.Requests, want.CompletionTokens, want.ReasoningTokens = 6, 30, 6
			if rows, err := l.UsageSince(ctx, "key_a", now); err != nil || len(rows) != 1 || rows[0] != want {
				t.Errorf("read back %+v (%v), want %+v", rows, err, want)
			}
			if used, err := l.QuotaUsed(ctx, "key_a", now); err != nil || used != math.MaxInt64 {
				t.Errorf("quota used %d (%v), want the largest int64", used, err)
			}
			if spent, err := l.CostUsed(ctx, "key_a", now); err != nil || spent != math.MaxInt64 {
				t.Errorf("cost used %d (%v), want the largest int64", spent, err)
			}
		})
	}
}

// TestLedgerSetsAsideRowsTheStoreRefuses: a row the store can never
// write is logged with its figures and set aside; the rest of its batch,
// later batches and the last flush of Stop reach the store.
func TestLedgerSetsAsideRowsTheStoreRefuses(t *testing.T) {
	for _, b := range usageBackends {
		t.Run(b.name, func(t *testing.T) {
			ctx := t.Context()
			st, _, breakClient := b.open(t)
			core, logs := observer.New(zapcore.ErrorLevel)
			l := New(zap.New(core))
			l.Attach(st)
			now := time.Now()
			breakClient("key_broken", store.Day(now))
			l.Add("key_a", "m", now, Tokens{Prompt: 10, Completion: 1})
			l.Add("key_broken", "m", now, Tokens{Prompt: 12345, Completion: 678})
			if err := l.Flush(ctx); err != nil {
				t.Errorf("flush with an unwritable row: %v", err)
			}
			l.Add("key_a", "m", now, Tokens{Prompt: 20, Completion: 2})
			if err := l.Flush(ctx); err != nil {
				t.Errorf("flush after an unwritable row: %v", err)
			}
			l.Add("key_a", "m", now, Tokens{Prompt: 30, Completion: 3})
			if err := l.Flush(ctx); err != nil { // as the service's Stop does
				t.Errorf("last flush: %v", err)
			}

			want := store.UsageRow{Client: "key_a", Day: store.Day(now), Model: "m", Requests: 3, PromptTokens: 60, CompletionTokens: 6}
			if rows, err := st.UsageSince(ctx, "key_a", store.Day(now)); err != nil || len(rows) != 1 || rows[0] != want {
				t.Errorf("stored %+v (%v), want %+v", rows, err, want)
			}
			set := logs.FilterMessageSnippet("set aside").All()
			if len(set) != 1 {
				t.Fatalf("%d logs of rows set aside, want 1: %v", len(set), logs.All())
			}
			rows, _ := set[0].ContextMap()["rows"].([]store.UsageRow)
			if len(rows) != 1 || rows[0].Client != "key_broken" || rows[0].Day != store.Day(now) || rows[0].PromptTokens != 12345 || rows[0].CompletionTokens != 678 {
				t.Errorf("rows set aside %+v, want key_broken's with its figures", set[0].ContextMap())
			}
		})
	}
}

// TestLedgerKeepsCost: the cost of each use reaches the store beside its
// tokens, per model and day, and CostUsed sums it since a time, pending
// rows included.
func TestLedgerKeepsCost(t *testing.T) {
	for _, b := range usageBackends {
		t.Run(b.name, func(t *testing.T) {
			ctx, st, l := ledgerOn(t, b.open)
			now := time.Now()
			yesterday := now.Add(-24 * time.Hour)
			l.Add("key_a", "fast", yesterday, Tokens{Prompt: 10, Completion: 10, Cost: 1_000_000})
			l.Add("key_a", "fast", now, Tokens{Prompt: 10, Completion: 20, Cost: 9})
			l.Add("key_a", "fast", now, Tokens{Prompt: 10, Completion: 20, Cost: 11})
			l.Add("key_a", "free", now, Tokens{Prompt: 10, Completion: 20})
			l.Add("key_b", "fast", now, Tokens{Prompt: 10, Completion: 20, Cost: 500})
			if err := l.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			l.Add("key_a", "fast", now, Tokens{Prompt: 1, Completion: 1, Cost: 7}) // pending
			rows, err := st.UsageSince(ctx, "key_a", store.Day(now))
			want := []store.UsageRow{
				{Client: "key_a", Day: store.Day(now), Model: "fast", Requests: 2, PromptTokens: 20, CompletionTokens: 40, Cost: 20},
				{Client: "key_a", Day: store.Day(now), Model: "free", Requests: 1, PromptTokens: 10, CompletionTokens: 20},
			}
			if err != nil || !slices.Equal(rows, want) {
				t.Errorf("stored %+v (%v), want %+v", rows, err, want)
			}
			for _, c := range []struct {
				since time.Time
				want  int64
			}{{now, 27}, {yesterday, 1_000_027}} {
				if spent, err := l.CostUsed(ctx, "key_a", c.since); err != nil || spent != c.want {
					t.Errorf("CostUsed since %s = %d (%v), want %d", store.Day(c.since), spent, err, c.want)
				}
			}
		})
	}
}

// TestLedgerRecordsRunningUses: a running use is recorded at each flush
// by what its meter says, for its caller and its minting key, its
// request once; Finish adds the rest of its final charge, which wins
// over what was recorded, so that the stored rows add up to the charge.
func TestLedgerRecordsRunningUses(t *testing.T) {
	for _, b := range usageBackends {
		t.Run(b.name, func(t *testing.T) {
			ctx, st, l := ledgerOn(t, b.open)
			now := time.Now()
			var used Tokens
			r := l.Begin("mint:key_m:u", "key_m", "fast", func() Tokens { return used })
			sum := func(client string) store.UsageRow {
				t.Helper()
				if err := l.Flush(ctx); err != nil {
					t.Fatal(err)
				}
				rows, err := st.UsageSince(ctx, client, store.Day(now))
				if err != nil {
					t.Fatal(err)
				}
				var s store.UsageRow
				for _, row := range rows {
					s.Add(row)
				}
				s.Client, s.Day, s.Model = "", "", ""
				return s
			}
			if got := sum("key_m"); got != (store.UsageRow{}) {
				t.Errorf("before any use: %+v, want nothing", got)
			}
			used = Tokens{Prompt: 40, Completion: 10, Cost: 5}
			if got, want := sum("key_m"), (store.UsageRow{Requests: 1, PromptTokens: 40, CompletionTokens: 10, Cost: 5}); got != want {
				t.Errorf("after a flush: %+v, want %+v", got, want)
			}
			used.Completion = 30
			if got, want := sum("mint:key_m:u"), (store.UsageRow{Requests: 1, PromptTokens: 40, CompletionTokens: 30, Cost: 5}); got != want {
				t.Errorf("after another: %+v, want %+v", got, want)
			}
			// The upstream reports a smaller prompt than estimated.
			l.Finish(r, "fast", now, Tokens{Prompt: 25, Completion: 31, Cost: 4}, true)
			used = Tokens{Prompt: 1000} // no longer read
			for _, client := range []string{"mint:key_m:u", "key_m"} {
				if got, want := sum(client), (store.UsageRow{Requests: 1, PromptTokens: 25, CompletionTokens: 31, Cost: 4}); got != want {
					t.Errorf("%s after Finish: %+v, want its charge %+v", client, got, want)
				}
			}
			// A use that never ran counts its request as Add does, or not.
			l.Finish(l.Begin("key_x", "", "fast", func() Tokens { return Tokens{} }), "(not answered)", now, Tokens{}, true)
			l.Finish(l.Begin("key_x", "", "fast", func() Tokens { return Tokens{} }), "fast", now, Tokens{}, false)
			if got, want := sum("key_x"), (store.UsageRow{Requests: 1}); got != want {
				t.Errorf("uses that never ran: %+v, want %+v", got, want)
			}
		})
	}
}

// slowStore is a usage store whose first write or first read can be
// held where it is, as a slow disk or a stalled Redis holds it: a write
// is applied only once released.
type slowStore struct {
	store.Backend                  // nil: the ledger uses only the usage methods below
	mu            sync.Mutex       // protects the fields below
	rows, hours   []store.UsageRow // what it holds
	refusals      []store.RefusalRow
	stallWrite    bool          // the next write stalls
	stallRead     bool          // the next read stalls
	began         chan struct{} // a stalled call says here that it began, then waits on release
	release       chan struct{}
}

// stall stalls the next call when *next is set, once.
func (s *slowStore) stall(next *bool) {
	s.mu.Lock()
	stall := *next
	*next = false
	s.mu.Unlock()
	if stall {
		s.began <- struct{}{}
		<-s.release
	}
}

func (s *slowStore) AddUsage(_ context.Context, b store.UsageBatch) error {
	s.stall(&s.stallWrite)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rows, s.hours, s.refusals = append(s.rows, b.Rows...), append(s.hours, b.Hours...), append(s.refusals, b.Refusals...)
	return nil
}

func (s *slowStore) UsageSince(context.Context, string, string) ([]store.UsageRow, error) {
	s.stall(&s.stallRead)
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.rows), nil
}

func (s *slowStore) UsageHours(context.Context, string, string) ([]store.UsageRow, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.hours), nil
}

func (s *slowStore) RefusalHours(context.Context, string, string) ([]store.RefusalRow, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.refusals), nil
}

// TestLedgerReadsEachBatchOnceWhileItIsWritten: a read while a batch is
// being written counts it once, neither in no place (its rows left the
// pending ones, the store has not applied them yet) nor in both (the
// read took the pending rows, then the store applied them), and a write
// stalled longer than a moment holds neither the reads nor the next
// flush. A quota loaded from a read that missed the batch would let a
// client spend its last flush's usage again.
func TestLedgerReadsEachBatchOnceWhileItIsWritten(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name      string
		readFirst bool          // the read stalls, and a flush runs meanwhile; else the reverse
		release   time.Duration // how long the stalled call is held after the other began
	}{
		{"a read during the write", false, 50 * time.Millisecond},
		{"a read during a stalled write", false, time.Minute},
		{"a write during the read", true, 50 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := t.Context()
			st := &slowStore{stallWrite: !tc.readFirst, stallRead: tc.readFirst, began: make(chan struct{}), release: make(chan struct{})}
			l := New(zap.NewNop())
			l.Attach(st)
			l.Add("key_a", "m", now, Tokens{Prompt: 10, Completion: 5})
			if err := l.Refuse("key_a", "rate_limit_exceeded", now); err != nil {
				t.Fatal(err)
			}

			flushed, read := make(chan error, 1), make(chan int64, 1)
			flush := func() { flushed <- l.Flush(ctx) }
			quota := func() {
				used, err := l.QuotaUsed(ctx, "key_a", now.Add(-time.Hour))
				if err != nil {
					t.Error(err)
				}
				// The dashboard's reads, by hour, of usage and refusals.
				hours, err := l.Hours(ctx, "key_a", now.Add(-time.Hour))
				if err != nil {
					t.Error(err)
				}
				refusals, err := l.RefusalHours(ctx, "key_a", now.Add(-time.Hour))
				if err != nil {
					t.Error(err)
				}
				if len(hours) != 1 || hours[0].TotalTokens() != 15 || len(refusals) != 1 || refusals[0].Count != 1 {
					t.Errorf("by hour: usage %+v and refusals %+v, want one row each, of 15 tokens and 1 refusal", hours, refusals)
				}
				read <- used
			}
			if tc.readFirst {
				go quota()
				<-st.began
				go flush()
				select {
				case err := <-flushed:
					flushed <- err
				case <-time.After(10 * time.Second):
					t.Error("the flush waited for the stalled read")
				}
			} else {
				go flush()
				<-st.began
				go quota()
			}
			released := time.AfterFunc(tc.release, func() { close(st.release) })
			defer func() {
				if released.Stop() {
					close(st.release)
				}
			}()
			if used := <-read; used != 15 {
				t.Errorf("quota used %d, want the batch's 15, once", used)
			}
			if !tc.readFirst {
				switch {
				case released.Stop():
					close(st.release)
				case tc.release > time.Second:
					t.Error("the read waited for the stalled write")
				}
			}
			if err := <-flushed; err != nil {
				t.Fatal(err)
			}
			if used, _ := l.QuotaUsed(ctx, "key_a", now.Add(-time.Hour)); used != 15 {
				t.Errorf("quota used %d once written, want 15", used)
			}
		})
	}
}
