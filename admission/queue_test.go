package admission

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/limiter"
)

// dispatchN serves n waiters of s in its order and counts them by tier
// and by caller.
func dispatchN(t *testing.T, s *sched, n int) (byTier, byCaller map[string]int) {
	t.Helper()
	byTier, byCaller = map[string]int{}, map[string]int{}
	names := map[*waiter]string{}
	for _, tq := range s.tiers {
		for _, c := range tq.callers {
			for _, w := range c.waiters {
				names[w] = c.id
			}
		}
	}
	for range n {
		w := s.head()
		if w == nil {
			t.Fatal("the order ran dry")
		}
		byTier[w.tq.name]++
		byCaller[names[w]]++
		s.dispatch(w)
	}
	return byTier, byCaller
}

func mustPush(t *testing.T, s *sched, tier string, weight int, id string) *waiter {
	t.Helper()
	w := &waiter{tier: tier}
	if err := s.push(w, tier, weight, id, 1<<20, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	return w
}

// Two backlogged tiers of weights 3 and 1 share dispatches exactly 3:1.
func TestSchedWeights(t *testing.T) {
	s := newSched()
	for i := range 400 {
		mustPush(t, &s, "pro", 3, fmt.Sprint("p", i%7))
		mustPush(t, &s, "free", 1, fmt.Sprint("f", i%5))
	}
	byTier, _ := dispatchN(t, &s, 400)
	if byTier["pro"] != 300 || byTier["free"] != 100 {
		t.Errorf("got pro %d free %d of 400, want 300 and 100", byTier["pro"], byTier["free"])
	}
}

// A tier that was idle rejoins at the current virtual time: it banks no
// credit, and does not take every turn until it has caught up.
func TestSchedIdleTierBanksNothing(t *testing.T) {
	s := newSched()
	for range 200 {
		mustPush(t, &s, "pro", 1, "p")
	}
	dispatchN(t, &s, 100) // free was idle meanwhile
	for range 200 {
		mustPush(t, &s, "free", 1, "f")
	}
	byTier, _ := dispatchN(t, &s, 100)
	if byTier["pro"] < 49 || byTier["pro"] > 51 {
		t.Errorf("after free rejoined: pro %d free %d of 100, want about 50 each", byTier["pro"], byTier["free"])
	}
}

// Within a tier, callers take turns: one with ten times the others'
// requests gets no more than they do.
func TestSchedCallersTakeTurns(t *testing.T) {
	s := newSched()
	for c := range 10 {
		n := 20
		if c == 0 {
			n = 200
		}
		for range n {
			mustPush(t, &s, "free", 1, fmt.Sprint("c", c))
		}
	}
	_, byCaller := dispatchN(t, &s, 100)
	for c := range 10 {
		if got := byCaller[fmt.Sprint("c", c)]; got < 9 || got > 11 {
			t.Errorf("caller c%d got %d of 100 dispatches, want 10 (±1): %v", c, got, byCaller)
		}
	}
}

func TestSchedBounds(t *testing.T) {
	s := newSched()
	for range 2 {
		if err := s.push(&waiter{}, "free", 1, "a", 3, 2, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.push(&waiter{}, "free", 1, "a", 3, 2, 0); !errors.Is(err, errCallerFull) {
		t.Errorf("a third place of a caller with per_caller 2: got %v, want errCallerFull", err)
	}
	if err := s.push(&waiter{}, "free", 1, "b", 3, 2, 2); !errors.Is(err, errCallerFull) {
		t.Errorf("a caller holding 2 places elsewhere, asking a third: got %v, want errCallerFull", err)
	}
	if err := s.push(&waiter{}, "pro", 1, "b", 3, 2, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.push(&waiter{}, "pro", 1, "c", 3, 2, 0); !errors.Is(err, errFull) {
		t.Errorf("a fourth place in a queue of length 3: got %v, want errFull", err)
	}
	if s.n != 3 || s.lengths()["free"] != 2 || s.lengths()["pro"] != 1 {
		t.Errorf("lengths %v, n %d; want free 2, pro 1", s.lengths(), s.n)
	}
}

// clock is a stepped clock.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) step(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// result is what a waiting request got.
type result struct {
	name  string
	lease limiter.Lease
	f     *Refusal
}

// testQueue is a queue over an upstream account of one slot, whose
// dispatcher the test runs by hand.
func testQueue(t *testing.T, maxWait time.Duration, length, perCaller int) (*Queue, *clock) {
	t.Helper()
	c := &clock{now: time.Unix(1_700_000_000, 0)}
	q := NewQueue(QueueConfig{
		Limiter: limiter.NewMemory(nil, 1000), Account: UpstreamPrefix + "test",
		Limits: &limiter.Limits{Concurrent: 1}, Length: length, PerCaller: perCaller,
		Default: TierQueue{Weight: 1, MaxWait: maxWait}, Now: c.Now,
	})
	return q, c
}

// wait queues a request in the background and returns where its result
// arrives, once it is queued (n waiters in all).
func wait(t *testing.T, q *Queue, ctx context.Context, name, caller string, n int) <-chan result {
	t.Helper()
	out := make(chan result, 1)
	go func() {
		lease, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: caller})
		out <- result{name, lease, f}
	}()
	for q.queued() != n {
		runtime.Gosched()
	}
	return out
}

func (q *Queue) queued() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.order.n
}

// A waiter that leaves frees its place: the next one is admitted when
// the slot frees, and the one that left holds nothing.
func TestQueueCancelledWaiterLeaves(t *testing.T) {
	q, _ := testQueue(t, time.Hour, 10, 10)
	ctx := context.Background()
	first, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "a"})
	if f != nil {
		t.Fatalf("the first request, on an idle queue: %v", f.Err)
	}
	gone, cancel := context.WithCancel(ctx)
	b := wait(t, q, gone, "b", "b", 1)
	c := wait(t, q, ctx, "c", "c", 2)
	if next := q.Dispatch(); next <= 0 {
		t.Errorf("Dispatch with the slot taken and 2 waiting returned %v, want a time to try again", next)
	}
	cancel()
	if r := <-b; r.f == nil || r.f.Err.Code != "queue_left" {
		t.Fatalf("the waiter that left got %+v, want queue_left", r)
	}
	if n := q.queued(); n != 1 {
		t.Fatalf("%d waiting after one left, want 1", n)
	}
	q.Settle(ctx, first, 0)
	q.Dispatch()
	if r := <-c; r.f != nil {
		t.Fatalf("the next waiter after the slot freed: %v", r.f.Err)
	}
	// c holds the one slot: nothing is left held by b.
	if d, _ := q.cfg.Limiter.Admit(ctx, q.cfg.Account, q.cfg.Limits, 0, time.Now()); d.Reason != limiter.ConcurrencyLimit {
		t.Errorf("with c admitted, the account admitted another: %v", d.Reason)
	}
}

// No jumping: while anything waits, a newcomer queues behind even when
// capacity is free.
func TestQueueNoJumping(t *testing.T) {
	q, _ := testQueue(t, time.Hour, 10, 10)
	ctx := context.Background()
	first, _, _ := q.Upstream(ctx, Turn{Tier: "free", Caller: "a"})
	b := wait(t, q, ctx, "b", "b", 1)
	q.Settle(ctx, first, 0)
	c := wait(t, q, ctx, "c", "c", 2)
	q.Dispatch()
	if r := <-b; r.f != nil {
		t.Fatalf("b, first in line: %v", r.f.Err)
	}
	select {
	case r := <-c:
		t.Fatalf("c was admitted before b's slot freed: %+v", r)
	default:
	}
	if n := q.queued(); n != 1 {
		t.Errorf("%d waiting, want c", n)
	}
}

// measured has the queue measure its pace, one dispatch every 2 s, with
// requests waiting: its one slot held, five requests wait in turn, each
// dispatched 2 s after the one before. It returns the slot, held by the
// last, with nothing left queued. A dispatch with nothing queued would
// measure nothing.
func measured(t *testing.T, q *Queue, clk *clock) limiter.Lease {
	t.Helper()
	ctx := context.Background()
	hold, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "m"})
	if f != nil {
		t.Fatal(f.Err)
	}
	for i := range 5 {
		next := wait(t, q, ctx, "m"+strconv.Itoa(i), "m", 1)
		clk.step(2 * time.Second)
		q.Settle(ctx, hold, 0)
		q.Dispatch()
		r := <-next
		if r.f != nil {
			t.Fatal(r.f.Err)
		}
		hold = r.lease
	}
	return hold
}

// A site whose traffic is sparse measures no pace from its idle gaps: a
// request that must wait behind the one slot, though requests came 2.5 s
// apart before, waits for its turn instead of being refused at once.
func TestQueueIdleGapsAreNoPace(t *testing.T) {
	q, clk := testQueue(t, 2*time.Second, 100, 100)
	ctx := context.Background()
	for range 3 {
		lease, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "a"})
		if f != nil {
			t.Fatal(f.Err)
		}
		q.Settle(ctx, lease, 0)
		clk.step(2500 * time.Millisecond)
	}
	hold, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "a"})
	if f != nil {
		t.Fatal(f.Err)
	}
	b := make(chan result, 1)
	go func() {
		lease, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "b"})
		b <- result{"b", lease, f}
	}()
	for q.queued() != 1 {
		select {
		case r := <-b:
			t.Fatalf("b, behind a slot that frees in 0.5 s, max_wait 2s: refused at once (%v), want it queued", r.f.Err)
		default:
			runtime.Gosched()
		}
	}
	clk.step(500 * time.Millisecond)
	q.Settle(ctx, hold, 0)
	q.Dispatch()
	if r := <-b; r.f != nil {
		t.Fatalf("b, behind a slot that freed in 0.5 s, max_wait 2s: %v, want its turn", r.f.Err)
	}
}

// The bounds refuse at once with queue_full, and the Retry-After is
// what the measured dispatch rate makes of the places before it.
func TestQueueFullRetryAfterHonest(t *testing.T) {
	q, clk := testQueue(t, time.Hour, 4, 2)
	ctx := context.Background()
	// Measure: one dispatch every 2 s.
	hold := measured(t, q, clk)
	wait(t, q, ctx, "a1", "a", 1)
	wait(t, q, ctx, "a2", "a", 2)
	if _, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "a"}); f == nil || f.Err.Code != "queue_full" {
		t.Errorf("a third place for a caller of per_caller 2: %+v, want queue_full", f)
	}
	wait(t, q, ctx, "b1", "b", 3)
	wait(t, q, ctx, "b2", "b", 4)
	_, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "c"})
	if f == nil || f.Err.Code != "queue_full" {
		t.Fatalf("a fifth in a queue of length 4: %+v, want queue_full", f)
	}
	// Callers take turns: a1 and b1 before its own, 3 dispatches of
	// 2 s, though a2 and b2 are queued too.
	if f.Err.RetryAfter != 6 {
		t.Errorf("Retry-After %d, want 6 (3 turns at the measured 2 s each)", f.Err.RetryAfter)
	}
	q.Settle(ctx, hold, 0)
}

// A newcomer whose turn cannot come within max_wait is refused at once,
// with the wait it would have had, not queued to time out.
func TestQueueRefusesWhatItCannotKeep(t *testing.T) {
	q, clk := testQueue(t, 5*time.Second, 100, 100)
	ctx := context.Background()
	hold := measured(t, q, clk)
	wait(t, q, ctx, "a", "a", 1)
	wait(t, q, ctx, "b", "b", 2) // its turn: 2 turns, 4 s
	_, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "c"})
	if f == nil || f.Err.Code != "queue_timeout" || f.Err.RetryAfter != 6 {
		t.Fatalf("a third, 6 s away with max_wait 5s: %+v, want queue_timeout with Retry-After 6", f)
	}
	if n := q.queued(); n != 2 {
		t.Errorf("%d waiting, want 2: the refused one never queued", n)
	}
	q.Settle(ctx, hold, 0)
}

// A light caller arriving behind a heavy caller's backlog is told the
// wait its own turn takes, since callers take turns, and may queue: the
// heavy caller's places beyond its share are the ones refused. Before,
// every place of the tier counted as ahead of it, and under saturation
// the light callers were refused while the heavy one was served.
func TestQueueLightCallerBehindAHeavyOne(t *testing.T) {
	q, clk := testQueue(t, 5*time.Second, 100, 100)
	ctx := context.Background()
	hold := measured(t, q, clk)
	h1 := wait(t, q, ctx, "h1", "heavy", 1)
	h2 := wait(t, q, ctx, "h2", "heavy", 2)
	if _, _, f := q.Upstream(ctx, Turn{Tier: "free", Caller: "heavy"}); f == nil || f.Err.Code != "queue_timeout" {
		t.Fatalf("the heavy caller's third, 6 s away with max_wait 5s: %+v, want queue_timeout", f)
	}
	l1 := wait(t, q, ctx, "l1", "light", 3) // after h1: 2 turns, 4 s
	q.Settle(ctx, hold, 0)
	q.Dispatch()
	r := <-h1
	if r.f != nil {
		t.Fatalf("h1: %v", r.f.Err)
	}
	q.Settle(ctx, r.lease, 0)
	q.Dispatch()
	select {
	case r := <-l1:
		if r.f != nil {
			t.Fatalf("l1: %v", r.f.Err)
		}
		q.Settle(ctx, r.lease, 0)
	case r := <-h2:
		t.Fatalf("%s went before l1: the light caller's turn comes before the heavy one's second", r.name)
	}
	q.Dispatch()
	if r := <-h2; r.f != nil {
		t.Fatalf("h2: %v", r.f.Err)
	}
}

// The dispatcher goroutine ends at Stop.
func TestQueueStop(t *testing.T) {
	before := runtime.NumGoroutine()
	q, _ := testQueue(t, time.Second, 10, 10)
	q.Start()
	q.poke()
	q.Stop()
	// Stop returns once the dispatcher said it ends; the runtime counts
	// it gone a moment later, which a machine busy with -race can make
	// long.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if runtime.NumGoroutine() <= before {
			return
		}
	}
	t.Errorf("goroutines: %d before, %d 5 s after Stop", before, runtime.NumGoroutine())
}

// A queue stopped (its config replaced) still serves what it queued,
// then its dispatcher ends.
func TestQueueStopServesItsWaiters(t *testing.T) {
	q, _ := testQueue(t, time.Hour, 10, 10)
	q.Start()
	ctx := context.Background()
	hold, _, _ := q.Upstream(ctx, Turn{Tier: "free", Caller: "a"})
	b := wait(t, q, ctx, "b", "b", 1)
	stopped := make(chan struct{})
	go func() { q.Stop(); close(stopped) }()
	q.Settle(ctx, hold, 0)
	if r := <-b; r.f != nil {
		t.Fatalf("the waiter of a stopping queue: %v", r.f.Err)
	}
	<-stopped
}

// lengths returns the waiters queued, by tier.
func (s *sched) lengths() map[string]int {
	m := make(map[string]int, len(s.tiers))
	for name, t := range s.tiers {
		m[name] = t.n
	}
	return m
}
