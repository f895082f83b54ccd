package limiter

import (
	"context"
	"errors"
	"math"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
)

var t0 = time.Date(2026, 3, 31, 23, 0, 0, 0, time.UTC)

func TestMemoryExactUnderConcurrency(t *testing.T) {
	m := NewMemory(nil, 1000)
	lim := &Limits{Requests: Rate{N: 100, Window: time.Minute, Burst: 100}}
	var admitted atomic.Int64
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			for range 10 {
				d, err := m.Admit(t.Context(), "c", lim, 0, t0)
				if err != nil {
					t.Error(err)
				}
				if d.Reason == Admitted {
					admitted.Add(1)
					m.Settle(t.Context(), "c", lim, Lease{Reserved: 0}, 0, t0)
				}
			}
		})
	}
	wg.Wait()
	if got := admitted.Load(); got != 100 {
		t.Fatalf("admitted %d of 500, want exactly 100", got)
	}
	// The rate refills 100 a minute: after 6s exactly 10 more.
	later := t0.Add(6 * time.Second)
	n := 0
	for range 50 {
		if d, _ := m.Admit(t.Context(), "c", lim, 0, later); d.Reason == Admitted {
			n++
		}
	}
	if n != 10 {
		t.Errorf("after 6s admitted %d, want exactly 10", n)
	}
}

func TestMemoryRefusalReasons(t *testing.T) {
	ctx := context.Background()
	cases := []struct {
		name    string
		lim     Limits
		setup   func(m *Memory, lim *Limits)
		reserve int64
		want    Reason
		retry   time.Duration
	}{
		{
			name: "requests", lim: Limits{Requests: Rate{N: 60, Window: time.Minute, Burst: 1}},
			setup: func(m *Memory, lim *Limits) { m.Admit(ctx, "c", lim, 0, t0) },
			want:  RequestLimit, retry: time.Second,
		},
		{
			name: "tokens", lim: Limits{Tokens: Rate{N: 1000, Window: time.Minute}},
			setup:   func(m *Memory, lim *Limits) { m.Admit(ctx, "c", lim, 900, t0) },
			reserve: 200, want: TokenLimit, retry: 6 * time.Second,
		},
		{
			name: "more than the token burst", lim: Limits{Tokens: Rate{N: 1000, Window: time.Minute}},
			reserve: 1001, want: TooLarge, retry: -1,
		},
		{
			name: "concurrency", lim: Limits{Concurrent: 2},
			setup: func(m *Memory, lim *Limits) { m.Admit(ctx, "c", lim, 0, t0); m.Admit(ctx, "c", lim, 0, t0) },
			want:  ConcurrencyLimit, retry: time.Second,
		},
		{
			name: "daily quota", lim: Limits{Quota: Quota{N: 100, Period: Day}},
			setup:   func(m *Memory, lim *Limits) { m.Admit(ctx, "c", lim, 90, t0) },
			reserve: 20, want: QuotaLimit, retry: time.Hour,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := NewMemory(nil, 100)
			if tc.setup != nil {
				tc.setup(m, &tc.lim)
			}
			before, _ := m.State(ctx, "c", &tc.lim, t0)
			d, err := m.Admit(ctx, "c", &tc.lim, tc.reserve, t0)
			if err != nil {
				t.Fatal(err)
			}
			if d.Reason != tc.want || d.RetryAfter != tc.retry {
				t.Errorf("got %v retry %v, want %v retry %v", d.Reason, d.RetryAfter, tc.want, tc.retry)
			}
			if after, _ := m.State(ctx, "c", &tc.lim, t0); after != before {
				t.Errorf("a refusal changed the state: %+v → %+v", before, after)
			}
		})
	}
}

func TestMemorySettleReplacesReservation(t *testing.T) {
	ctx := context.Background()
	lim := &Limits{Tokens: Rate{N: 1000, Window: time.Minute}, Quota: Quota{N: 5000, Period: Month}, Concurrent: 1}
	m := NewMemory(nil, 100)
	d, _ := m.Admit(ctx, "c", lim, 500, t0)
	if d.Reason != Admitted || d.TokensRemaining != 500 || d.QuotaUsed != 500 || d.InFlight != 1 {
		t.Fatalf("after admit: %+v, want 500 reserved and 1 in flight", d)
	}
	m.Settle(ctx, "c", lim, Lease{Reserved: 500}, 120, t0) // used less: refund
	s, _ := m.State(ctx, "c", lim, t0)
	if s.TokensRemaining != 880 || s.QuotaUsed != 120 || s.InFlight != 0 {
		t.Errorf("after settling 120 of 500: %+v, want 880 left, quota 120, none in flight", s)
	}
	m.Admit(ctx, "c", lim, 100, t0)
	m.Settle(ctx, "c", lim, Lease{Reserved: 100}, 1100, t0) // used more: charged, into debt
	s, _ = m.State(ctx, "c", lim, t0)
	if s.TokensRemaining != 0 || s.QuotaUsed != 1220 {
		t.Errorf("after settling 1100 of 100: %+v, want 0 left, quota 1220", s)
	}
	if d, _ := m.Admit(ctx, "c", lim, 1, t0); d.Reason != TokenLimit || d.RetryAfter != 13*time.Second+260*time.Millisecond {
		t.Errorf("in debt: %v retry %v, want tokens for 13.26s (221 tokens at 1000/min)", d.Reason, d.RetryAfter)
	}
}

// reserveLimits are the limits of the Reserve tests, with a quota of
// quota tokens a day: a window so long (a token an hour) that Redis'
// moving clock refills nothing that shows, so that the same figures hold
// for Memory and Redis.
func reserveLimits(quota int64) *Limits {
	return &Limits{
		Requests:   Rate{N: 10, Window: 1000 * time.Hour},
		Tokens:     Rate{N: 1000, Window: 1000 * time.Hour},
		Concurrent: 2,
		Quota:      Quota{N: quota, Period: Day},
	}
}

// reserveCase is a Reserve of tokens by a request admitted with held,
// after an earlier request of the same client used earlier; the Reserve
// tests of Memory and Redis share them.
type reserveCase struct {
	name    string
	quota   int64
	earlier int64
	held    int64
	tokens  int64
	want    Reason
	retry   time.Duration // ignored for QuotaLimit: until the day ends
}

var reserveCases = []reserveCase{
	{name: "passes", quota: 1500, tokens: 400, want: Admitted},
	{name: "passes, added to what the lease holds", quota: 1500, held: 300, tokens: 700, want: Admitted},
	{name: "more than the burst", quota: 1500, tokens: 1001, want: TooLarge, retry: -1},
	{name: "more than the burst with what the lease holds", quota: 1500, held: 600, tokens: 401, want: TooLarge, retry: -1},
	// 100 tokens beyond the burst, at a token an hour.
	{name: "tokens", quota: 1500, earlier: 900, tokens: 200, want: TokenLimit, retry: 100 * time.Hour},
	{name: "quota", quota: 520, earlier: 500, tokens: 30, want: QuotaLimit},
	{name: "quota before tokens", quota: 1000, earlier: 950, tokens: 51, want: QuotaLimit},
	{name: "the quota counts what the lease holds", quota: 1000, earlier: 500, held: 300, tokens: 201, want: QuotaLimit},
}

// counts are a State's figures but for the times, which move on with
// Redis' clock.
func counts(s State) [4]int64 {
	return [4]int64{s.RequestsRemaining, s.TokensRemaining, s.QuotaUsed, int64(s.InFlight)}
}

// testReserve runs a reserveCase against l, at now() for Memory's sake:
// Redis has its own clock.
func testReserve(t *testing.T, l Limiter, tc reserveCase, now func() time.Time) {
	ctx := t.Context()
	lim := reserveLimits(tc.quota)
	if tc.earlier > 0 {
		d, err := l.Admit(ctx, "c", lim, 0, now())
		if err != nil || d.Reason != Admitted {
			t.Fatalf("earlier: %v %v, want admitted", d.Reason, err)
		}
		if err := l.Settle(ctx, "c", lim, d.Lease, tc.earlier, now()); err != nil {
			t.Fatal(err)
		}
	}
	start, err := l.State(ctx, "c", lim, now())
	if err != nil {
		t.Fatal(err)
	}
	a, err := l.Admit(ctx, "c", lim, tc.held, now())
	if err != nil || a.Reason != Admitted {
		t.Fatalf("admit: %v %v, want admitted", a.Reason, err)
	}
	lease := a.Lease
	before, _ := l.State(ctx, "c", lim, now())
	want := tc.retry
	if tc.want == QuotaLimit {
		at := now()
		want = Day.End(at).Sub(at)
	}
	d, err := l.Reserve(ctx, "c", lim, lease, tc.tokens, now())
	if err != nil {
		t.Fatal(err)
	}
	lease = d.Lease
	if d.Reason != tc.want {
		t.Errorf("got %v, want %v", d.Reason, tc.want)
	}
	within(t, "retry after", d.RetryAfter, want, time.Second)
	after, _ := l.State(ctx, "c", lim, now())
	if counts(d.State) != counts(after) {
		t.Errorf("decision %+v, want the state %+v", d, after)
	}
	if tc.want == Admitted {
		want := before
		want.TokensRemaining -= tc.tokens
		want.QuotaUsed += tc.tokens
		if counts(after) != counts(want) || lease.Reserved != tc.held+tc.tokens || lease.ID != a.Lease.ID {
			t.Errorf("after reserving %d: %+v lease %+v, want %v and %d reserved", tc.tokens, after, lease, counts(want), tc.held+tc.tokens)
		}
	} else if counts(after) != counts(before) || lease != a.Lease {
		t.Errorf("a refusal changed the state or the lease: %+v %+v → %+v %+v", before, a.Lease, after, lease)
	} else if _, ok := l.(*Memory); ok && after != before {
		// Memory's clock stands still: its times must not move either.
		t.Errorf("a refusal changed the state: %+v → %+v", before, after)
	}
	// Still admitted: counted, and holding its slot until Settle.
	if after.InFlight != 1 || after.RequestsRemaining != start.RequestsRemaining-1 {
		t.Errorf("after Reserve: %+v, want the request counted and in flight", after)
	}
	if err := l.Settle(ctx, "c", lim, lease, 0, now()); err != nil {
		t.Fatal(err)
	}
	end, _ := l.State(ctx, "c", lim, now())
	want0 := start
	want0.RequestsRemaining--
	if counts(end) != counts(want0) {
		t.Errorf("settled with 0: %+v, want %v: the whole reservation refunded, the request counted", end, counts(want0))
	}
}

func TestMemoryReserve(t *testing.T) {
	for _, tc := range reserveCases {
		t.Run(tc.name, func(t *testing.T) {
			testReserve(t, NewMemory(nil, 100), tc, func() time.Time { return t0 })
		})
	}
}

func TestMemoryReserveSettleReplacesReservation(t *testing.T) {
	ctx := t.Context()
	lim := &Limits{Tokens: Rate{N: 1000, Window: time.Minute}, Quota: Quota{N: 5000, Period: Month}, Concurrent: 1}
	m := NewMemory(nil, 100)
	d, _ := m.Admit(ctx, "c", lim, 200, t0)
	d, _ = m.Reserve(ctx, "c", lim, d.Lease, 300, t0)
	if d.Reason != Admitted || d.TokensRemaining != 500 || d.QuotaUsed != 500 || d.Lease.Reserved != 500 {
		t.Fatalf("after 200 admitted and 300 reserved: %+v, want 500 reserved", d)
	}
	m.Settle(ctx, "c", lim, d.Lease, 50, t0)
	if s, _ := m.State(ctx, "c", lim, t0); s.TokensRemaining != 950 || s.QuotaUsed != 50 || s.InFlight != 0 {
		t.Errorf("after settling 50: %+v, want 950 left, quota 50, none in flight", s)
	}
}

// TestMemoryReserveLoadsQuota: a Reserve in a new period counts there,
// from the ledger's figure, as an Admit would.
func TestMemoryReserveLoadsQuota(t *testing.T) {
	ctx := t.Context()
	lim := &Limits{Quota: Quota{N: 1000, Period: Day}}
	m := NewMemory(fakeLedger{"c@2026-03-31": 900, "c@2026-04-01": 5}, 100)
	d, _ := m.Admit(ctx, "c", lim, 0, t0)
	midnight := Day.End(t0)
	d, _ = m.Reserve(ctx, "c", lim, d.Lease, 200, midnight)
	if d.Reason != Admitted || d.QuotaUsed != 205 {
		t.Fatalf("a reserve of 200 after midnight: %+v, want admitted with the ledger's 5 + 200", d)
	}
	m.Settle(ctx, "c", lim, d.Lease, 150, midnight)
	if s, _ := m.State(ctx, "c", lim, midnight); s.QuotaUsed != 155 {
		t.Errorf("after settling 150: quota %d, want 155", s.QuotaUsed)
	}
}

func TestReserveRejectsNegative(t *testing.T) {
	m := NewMemory(nil, 100)
	lim := &Limits{Tokens: Rate{N: 1000, Window: time.Minute}}
	d, _ := m.Admit(t.Context(), "c", lim, 100, t0)
	if r, err := m.Reserve(t.Context(), "c", lim, d.Lease, -50, t0); err == nil || r.Lease != d.Lease {
		t.Errorf("reserve -50: %v lease %+v, want an error and the lease unchanged", err, r.Lease)
	}
	if s, _ := m.State(t.Context(), "c", lim, t0); s.TokensRemaining != 900 {
		t.Errorf("after a negative reserve: %d tokens left, want 900", s.TokensRemaining)
	}
}

type fakeLedger map[string]int64

func (f fakeLedger) QuotaUsed(_ context.Context, client string, since time.Time) (int64, error) {
	return f[client+"@"+since.Format(time.DateOnly)], nil
}

func TestMemoryQuotaFromLedgerAndRollover(t *testing.T) {
	ctx := context.Background()
	lim := &Limits{Quota: Quota{N: 1000, Period: Month}}
	ledger := fakeLedger{"c@2026-03-01": 990, "c@2026-04-01": 5}
	m := NewMemory(ledger, 100)
	if d, _ := m.Admit(ctx, "c", lim, 20, t0); d.Reason != QuotaLimit || d.RetryAfter != time.Hour {
		t.Fatalf("990 used by the ledger + 20: %v retry %v, want quota until the month ends in 1h", d.Reason, d.RetryAfter)
	}
	if d, _ := m.Admit(ctx, "c", lim, 10, t0); d.Reason != Admitted || d.QuotaUsed != 1000 {
		t.Fatalf("990 + 10: %+v, want admitted at exactly 1000", d)
	}
	april := t0.Add(2 * time.Hour)
	if d, _ := m.Admit(ctx, "c", lim, 20, april); d.Reason != Admitted || d.QuotaUsed != 25 {
		t.Errorf("new month: %+v, want admitted with the ledger's 5 + 20", d)
	}
}

// TestMemoryRefundStaysInItsPeriod checks that a request reserved late in
// one day and settled small after midnight refunds the day it reserved
// in, not the next, which the caller could then spend twice.
func TestMemoryRefundStaysInItsPeriod(t *testing.T) {
	ctx := context.Background()
	lim := &Limits{Quota: Quota{N: 10_000, Period: Day}}
	beforeMidnight := time.Date(2026, 3, 31, 23, 59, 50, 0, time.UTC)
	afterMidnight := beforeMidnight.Add(15 * time.Second)
	for _, twoSteps := range []bool{false, true} {
		m := NewMemory(nil, 100)
		var late Decision
		if twoSteps { // as the handler does: admit, then reserve the estimate
			late, _ = m.Admit(ctx, "c", lim, 0, beforeMidnight)
			late, _ = m.Reserve(ctx, "c", lim, late.Lease, 10_000, beforeMidnight)
		} else {
			late, _ = m.Admit(ctx, "c", lim, 10_000, beforeMidnight)
		}
		if late.Reason != Admitted {
			t.Fatalf("the late request: %v, want admitted", late.Reason)
		}
		if d, _ := m.Admit(ctx, "c", lim, 9_000, afterMidnight); d.Reason != Admitted {
			t.Fatalf("the next day's first request: %v, want admitted", d.Reason)
		}
		if err := m.Settle(ctx, "c", lim, late.Lease, 100, afterMidnight); err != nil {
			t.Fatal(err)
		}
		d, _ := m.Admit(ctx, "c", lim, 9_000, afterMidnight)
		if d.Reason != QuotaLimit {
			t.Errorf("two steps %v: a second 9,000 in the new day: %v with %d used, want refused: the late request's refund crossed into the new day",
				twoSteps, d.Reason, d.QuotaUsed)
		}
	}
}

// TestMemoryNoteSharedQuota: a noted figure counts in the period it
// names, with what the Memory counted itself in that period on top, and
// a lease settles in the period it was admitted in whatever was noted
// since.
func TestMemoryNoteSharedQuota(t *testing.T) {
	ctx := t.Context()
	lim := &Limits{Quota: Quota{N: 10_000, Period: Day}}
	m := NewMemory(nil, 100)
	used := func(now time.Time) int64 {
		t.Helper()
		s, err := m.State(ctx, "c", lim, now)
		if err != nil {
			t.Fatal(err)
		}
		return s.QuotaUsed
	}
	today, midnight := Day.End(t0.AddDate(0, 0, -1)), Day.End(t0)

	m.NoteSharedQuota("c", lim, 9_000, midnight, t0)
	d, _ := m.Admit(ctx, "c", lim, 0, t0)
	late, _ := m.Reserve(ctx, "c", lim, d.Lease, 500, t0)
	if late.Reason != Admitted || late.QuotaUsed != 9_500 {
		t.Fatalf("500 on 9,000 noted: %+v, want admitted at 9,500", late)
	}
	m.NoteSharedQuota("c", lim, 9_200, midnight, t0)
	if got := used(t0); got != 9_700 {
		t.Errorf("9,200 noted with 500 counted here: %d used, want 9,700", got)
	}
	m.NoteSharedQuota("c", lim, 100, today, t0)
	if got := used(t0); got != 9_700 {
		t.Errorf("a figure of the day before: %d used, want 9,700 still", got)
	}

	// After midnight the next day's figure starts the period afresh, and
	// the late lease settling small refunds the day it counted in.
	m.NoteSharedQuota("c", lim, 50, Day.End(midnight), midnight)
	m.Settle(ctx, "c", lim, late.Lease, 0, midnight)
	if got := used(midnight); got != 50 {
		t.Errorf("the next day: %d used, want the 50 noted for it", got)
	}
	if d, _ := m.Admit(ctx, "c", lim, 9_951, midnight); d.Reason != QuotaLimit {
		t.Errorf("9,951 on the 50 noted: %v, want refused", d.Reason)
	}
	// Every shared answer is noted: for a remembered client, in place.
	if n := testing.AllocsPerRun(100, func() { m.NoteSharedQuota("c", lim, 60, Day.End(midnight), midnight) }); n != 0 {
		t.Errorf("noting a remembered client's figure: %v allocations, want none", n)
	}
}

func TestMemoryForgetsIdleClientsAndStaysBounded(t *testing.T) {
	ctx := context.Background()
	lim := &Limits{Requests: Rate{N: 10, Window: time.Second}}
	m := NewMemory(nil, 256*100)
	for i := range 100_000 {
		c := "c" + strconv.Itoa(i)
		m.Admit(ctx, c, lim, 0, t0)
		m.Settle(ctx, c, lim, Lease{Reserved: 0}, 0, t0)
	}
	if n := m.Clients(); n > 256*100 {
		t.Errorf("remembering %d clients, bound %d", n, 256*100)
	}
	// A second later every bucket is full again: traffic of other clients,
	// over every shard, sweeps the idle ones away.
	later := t0.Add(time.Second)
	const active = 2560
	for i := range 256 * sweepEvery * 8 {
		c := "d" + strconv.Itoa(i%active)
		m.Admit(ctx, c, lim, 0, later)
		m.Settle(ctx, c, lim, Lease{Reserved: 0}, 0, later)
	}
	if n := m.Clients(); n > active+256*100/10 {
		t.Errorf("after idle time, %d clients remembered, want about the %d active ones", n, active)
	}
}

// TestMemoryKeepsQuotaUseItCannotReadBack: an idle client is forgotten
// only when that loses nothing. Without a QuotaCounter its quota use
// cannot be read back, so it is kept until its period ends; with one,
// it is kept too while the shard has room, since reading it back is I/O
// that a client with only a quota would otherwise cost every request,
// and forgotten and read back when the shard is full.
func TestMemoryKeepsQuotaUseItCannotReadBack(t *testing.T) {
	ctx := t.Context()
	lim := &Limits{Requests: Rate{N: 10, Window: time.Second}, Quota: Quota{N: 10_000, Period: Day}}
	// idleTraffic admits and settles others at now, over every shard, so
	// that each shard sweeps its idle clients several times.
	idleTraffic := func(m *Memory, now time.Time) {
		for i := range memShards * sweepEvery * 8 {
			c := "d" + strconv.Itoa(i%2560)
			d, _ := m.Admit(ctx, c, lim, 0, now)
			m.Settle(ctx, c, lim, d.Lease, 0, now)
		}
	}
	remembered := func(m *Memory) bool {
		s := m.shard("c")
		s.mu.Lock()
		defer s.mu.Unlock()
		_, ok := s.m["c"]
		return ok
	}
	for _, counted := range []bool{false, true} {
		t.Run("counted "+strconv.FormatBool(counted), func(t *testing.T) {
			ledger := fakeLedger{}
			m := NewMemory(nil, 256*100)
			if counted {
				m = NewMemory(ledger, 256*100)
			}
			d, _ := m.Admit(ctx, "c", lim, 0, t0)
			m.Settle(ctx, "c", lim, d.Lease, 9_000, t0)
			ledger["c@2026-03-31"] = 9_000 // as the usage reaches the ledger
			idleTraffic(m, t0.Add(time.Second))
			if !remembered(m) {
				t.Error("idle with quota use in its period, the shard not full: forgotten")
			}
			if d, _ := m.Admit(ctx, "c", lim, 1_001, t0.Add(time.Second)); d.Reason != QuotaLimit {
				t.Errorf("1,001 more after 9,000: %v with %d used, want refused", d.Reason, d.QuotaUsed)
			}
			idleTraffic(m, Day.End(t0).Add(time.Second))
			if remembered(m) {
				t.Error("idle after its period ended: still remembered")
			}
		})
	}
	t.Run("counted, the shard full", func(t *testing.T) {
		ledger := fakeLedger{}
		m := NewMemory(ledger, memShards*4)
		d, _ := m.Admit(ctx, "c", lim, 0, t0)
		m.Settle(ctx, "c", lim, d.Lease, 9_000, t0)
		ledger["c@2026-03-31"] = 9_000
		idleTraffic(m, t0.Add(time.Second))
		if remembered(m) {
			t.Error("idle with quota use the ledger holds, the shard full: still remembered")
		}
		if d, _ := m.Admit(ctx, "c", lim, 1_001, t0.Add(time.Second)); d.Reason != QuotaLimit || d.QuotaUsed != 9_000 {
			t.Errorf("1,001 more after 9,000, read back: %v with %d used, want refused at 9,000", d.Reason, d.QuotaUsed)
		}
	})
}

func BenchmarkMemoryAdmitSettle(b *testing.B) {
	const clients = 1_000_000
	ctx := context.Background()
	lim := &Limits{
		Requests: Rate{N: 600, Window: time.Minute}, Tokens: Rate{N: 400_000, Window: time.Minute},
		Concurrent: 20, Quota: Quota{N: 50_000_000, Period: Month},
	}
	names := make([]string, clients)
	for i := range names {
		names[i] = "key_" + strconv.Itoa(i)
	}
	m := NewMemory(nil, 2*clients)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for _, c := range names {
		m.Admit(ctx, c, lim, 100, t0)
		m.Settle(ctx, c, lim, Lease{Reserved: 100}, 80, t0)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	perClient := float64(after.HeapAlloc-before.HeapAlloc) / clients
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c := names[i%clients]
		i++
		m.Admit(ctx, c, lim, 100, t0)
		m.Settle(ctx, c, lim, Lease{Reserved: 100}, 80, t0)
	}
	b.ReportMetric(perClient, "bytes/client")
}

// BenchmarkMemoryAdmitReserveSettle is a request admitted before its body
// is read: three calls, none of which may allocate.
func BenchmarkMemoryAdmitReserveSettle(b *testing.B) {
	ctx := context.Background()
	lim := &Limits{
		Requests: Rate{N: 600, Window: time.Minute}, Tokens: Rate{N: 400_000, Window: time.Minute},
		Concurrent: 20, Quota: Quota{N: 50_000_000, Period: Month},
	}
	names := make([]string, 10_000)
	for i := range names {
		names[i] = "key_" + strconv.Itoa(i)
	}
	m := NewMemory(nil, 2*len(names))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c := names[i%len(names)]
		i++
		d, _ := m.Admit(ctx, c, lim, 0, t0)
		if d, _ = m.Reserve(ctx, c, lim, d.Lease, 100, t0); d.Reason != Admitted {
			b.Fatal(d.Reason)
		}
		m.Settle(ctx, c, lim, d.Lease, 80, t0)
	}
}

func TestMemoryQuotaSumsSaturate(t *testing.T) {
	// The ledger's sums saturate: a client whose use read back is the
	// largest count has no room left, however the sums are taken.
	now := time.Now()
	m := NewMemory(fakeLedger{"full@" + Day.Start(now).Format(time.DateOnly): math.MaxInt64}, 100)
	lim := &Limits{Quota: Quota{N: 10_000, Period: Day}}
	for _, reserve := range []int64{0, 1} {
		if d, _ := m.Admit(t.Context(), "full", lim, reserve, now); d.Reason != QuotaLimit {
			t.Errorf("admit of %d at the largest use read back: %v, want quota", reserve, d.Reason)
		}
	}
	// Two huge charges add up to the largest count, not past it.
	a, _ := m.Admit(t.Context(), "c", lim, 0, now)
	b, _ := m.Admit(t.Context(), "c", lim, 0, now)
	m.Settle(t.Context(), "c", lim, a.Lease, math.MaxInt64, now)
	m.Settle(t.Context(), "c", lim, b.Lease, math.MaxInt64, now)
	if st, _ := m.State(t.Context(), "c", lim, now); st.QuotaUsed != math.MaxInt64 {
		t.Errorf("use after two huge charges: %d, want the largest count", st.QuotaUsed)
	}
	if d, _ := m.Admit(t.Context(), "c", lim, 0, now); d.Reason != QuotaLimit {
		t.Errorf("admit after two huge charges: %v, want quota", d.Reason)
	}
}

// TestSlotlessSettleTouchesNothing: a Fallback settles the lease of a
// request Redis admitted without a slot in its local limits (the lease
// names none); that costs no state there.
func TestSlotlessSettleTouchesNothing(t *testing.T) {
	m := NewMemory(nil, 100)
	if err := m.Settle(t.Context(), "c", &Limits{Concurrent: 0, NoSlot: true}, Lease{}, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	if n := m.Clients(); n != 0 {
		t.Errorf("%d clients remembered after settling a slotless lease, want 0", n)
	}
}

// testNoSlotReservesNothing checks that a backend refuses, with an
// error and without taking anything, to reserve for a request that takes
// no slot: nothing would show it in flight, and its account could be
// forgotten with the reservation out.
func testNoSlotReservesNothing(t *testing.T, l Limiter) {
	t.Helper()
	ctx := t.Context()
	lim := &Limits{Quota: Quota{N: 100, Period: Day}, NoSlot: true}
	if _, err := l.Admit(ctx, "noslot", lim, 10, time.Now()); !errors.Is(err, errNoSlotReserve) {
		t.Errorf("Admit reserving 10 without a slot: %v, want errNoSlotReserve", err)
	}
	d, err := l.Admit(ctx, "noslot", lim, 0, time.Now())
	if err != nil || d.Reason != Admitted {
		t.Fatalf("Admit reserving nothing without a slot: %v %v", d.Reason, err)
	}
	if _, err := l.Reserve(ctx, "noslot", lim, d.Lease, 10, time.Now()); !errors.Is(err, errNoSlotReserve) {
		t.Errorf("Reserve of 10 without a slot: %v, want errNoSlotReserve", err)
	}
	if s, err := l.State(ctx, "noslot", lim, time.Now()); err != nil || s.QuotaUsed != 0 {
		t.Errorf("quota used %d (%v), want 0: a refused reservation takes nothing", s.QuotaUsed, err)
	}
}

func TestMemoryNoSlotReservesNothing(t *testing.T) {
	testNoSlotReservesNothing(t, NewMemory(nil, 100))
	testNoSlotReservesNothing(t, newFallback(&flaky{Memory: NewMemory(nil, 100)}, NewMemory(nil, 100), UseLocal, zap.NewNop()))
}

// countingLedger counts the reads of a fakeLedger for client c.
type countingLedger struct {
	fakeLedger
	reads atomic.Int64
}

func (l *countingLedger) QuotaUsed(ctx context.Context, client string, since time.Time) (int64, error) {
	if client == "c" {
		l.reads.Add(1)
	}
	return l.fakeLedger.QuotaUsed(ctx, client, since)
}

// TestMemoryReadsAQuotaBackOnce: a client with a quota and no other
// limit, such as a budget's account, is idle as soon as it is settled;
// its quota is read from the QuotaCounter once, not again after each
// sweep, which would be I/O on most of its requests.
func TestMemoryReadsAQuotaBackOnce(t *testing.T) {
	ctx := t.Context()
	ledger := &countingLedger{fakeLedger: fakeLedger{}}
	m := NewMemory(ledger, 256*100)
	lim := &Limits{Quota: Quota{N: 1_000_000_000, Period: Day}}
	for i := range 1000 {
		d, err := m.Admit(ctx, "c", lim, 10, t0)
		if err != nil || d.Reason != Admitted {
			t.Fatalf("admit: %v %v", d.Reason, err)
		}
		m.Settle(ctx, "c", lim, d.Lease, 10, t0)
		// Others' requests meanwhile, over every shard: they sweep.
		for j := range 2 * memShards {
			o := "o" + strconv.Itoa((i*2*memShards+j)%5000)
			d, _ := m.Admit(ctx, o, &Limits{}, 0, t0)
			m.Settle(ctx, o, &Limits{}, d.Lease, 0, t0)
		}
	}
	if n := ledger.reads.Load(); n != 1 {
		t.Errorf("the quota was read from the ledger %d times in 1,000 requests, want once", n)
	}
}
