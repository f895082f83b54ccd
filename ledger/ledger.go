package ledger

import (
	"context"
	"crypto/rand"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
	"go.uber.org/zap"
)

// Tokens is what one request used, counted as the API's usage object
// counts it.
type Tokens struct {
	Prompt     int64
	Completion int64
	Cached     int64 // of Prompt: read from the upstream's prompt cache
	Reasoning  int64 // of Completion: spent reasoning, not in the answer
	Cost       int64 // micro-units of the currency; 0 for an unpriced model
}

// Total returns prompt plus completion tokens.
func (t Tokens) Total() int64 { return store.AddCount(t.Prompt, t.Completion) }

// rowKey names a pending row: its client, its time (a day, a 5-minute
// slot, or an hour once foldSlots folded the slot) and its model or
// refusal reason.
type rowKey struct{ client, at, name string }

// Ledger counts usage per client, model and UTC day. Adding is in memory;
// the rows are written in batches, at most flushEvery behind, and on Stop.
// Readers see stored and pending rows together, so nothing is missing
// from a quota or a usage answer while a batch waits or is written, and
// nothing counts twice while the store is well.
//
// The zero Ledger is not usable; New makes one. It is safe for
// concurrent use.
type Ledger struct {
	flushing sync.Mutex // one flush at a time, so batches reach the store in order
	logger   *zap.Logger
	mu       sync.Mutex // protects the fields below
	pending  map[rowKey]*store.UsageRow
	// slots are the pending uses by 5-minute slot (day holds the slot),
	// and refusals the pending refusals by slot: a flush writes them,
	// and the same summed by hour. They hold the rows of one flush
	// interval; while the store fails, those of the slots before the
	// last two are folded into their hour (see foldSlots).
	slots    map[rowKey]*store.UsageRow
	refusals map[rowKey]int64 // name holds the reason
	// running are the uses recorded as they go (see Begin).
	running map[*Running]struct{}
	// unsure is a batch whose write failed: it may or may not have been
	// applied, so it is written again as it is, before anything newer.
	unsure *store.UsageBatch
	// writing is the batch being written, as it left the pending rows:
	// the reads count it with them until the store has it.
	writing *store.UsageBatch
	// writeDone is closed when the write in flight ends, nil when none
	// is; moves counts the writes ended, so that a read can tell usage
	// may have reached the store while it read it (see read.do).
	writeDone chan struct{}
	moves     uint64
	writer    string
	seq       uint64        // of the last batch made
	store     store.Backend // nil until the service starts
	// today is the name of the last day a use was added on, kept so
	// that adding formats a date once a day, not once a request.
	today, thisSlot period
}

// New returns a Ledger that counts from now on and writes nothing until
// Attach gives it a store.
func New(logger *zap.Logger) *Ledger {
	return &Ledger{pending: make(map[rowKey]*store.UsageRow), slots: make(map[rowKey]*store.UsageRow),
		refusals: make(map[rowKey]int64), running: make(map[*Running]struct{}),
		writer: rand.Text(), logger: logger}
}

// Add counts one request of client for model at t, which used tokens.
func (l *Ledger) Add(client, model string, at time.Time, used Tokens) {
	l.mu.Lock()
	l.add(client, model, at, rowOf(used, 1))
	l.mu.Unlock()
}

// add adds u to the pending rows of client and model at t. The caller
// holds l.mu.
func (l *Ledger) add(client, model string, at time.Time, u store.UsageRow) {
	addPending(l.pending, rowKey{client, l.dayName(at), model}, u)
	addPending(l.slots, rowKey{client, l.slotName(at), model}, u)
}

func rowOf(t Tokens, requests int64) store.UsageRow {
	return store.UsageRow{Requests: requests, PromptTokens: t.Prompt, CompletionTokens: t.Completion,
		CachedTokens: t.Cached, ReasoningTokens: t.Reasoning, Cost: t.Cost}
}

// Running is a use that the ledger records while it goes on, a stream:
// at each flush, once a second, it adds what the use's meter says was
// used since the last, and Finish adds the rest of its final charge.
// Its rows then add up to that charge, once; an instance that dies in
// the middle of it (SIGKILL) has recorded all but its last second.
type Running struct {
	client, also string        // also: the minting key of a minted token's user, "" for none
	model        string        // of the rows recorded while it runs
	meter        func() Tokens // what was used so far; called under the ledger's lock, so cheap
	recorded     Tokens        // guarded by the ledger's mu
	counted      bool          // its request is in the rows
}

// Begin starts recording a use of client (and of also, when not "") for
// model as it goes, by meter, which must be cheap and safe to call from
// the ledger's flush: it reads what the use counted so far. Finish ends
// it, on every way out.
func (l *Ledger) Begin(client, also, model string, meter func() Tokens) *Running {
	r := &Running{client: client, also: also, model: model, meter: meter}
	l.mu.Lock()
	l.running[r] = struct{}{}
	l.mu.Unlock()
	return r
}

// Finish ends r, whose use was finally charged used for model at t: the
// rows get used less what was recorded of it while it ran, and its
// request, if it was not counted yet and record is set (as Add would
// count it). The final charge wins: when it is lower than what was
// recorded (the upstream reported fewer tokens than were estimated), the
// rest is a negative correction, so that the rows add up to the charge.
func (l *Ledger) Finish(r *Running, model string, at time.Time, used Tokens, record bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.running, r)
	if !record && !r.counted {
		return
	}
	var requests int64
	if !r.counted {
		requests = 1
	}
	u := rowOf(minus(used, r.recorded), requests)
	l.add(r.client, model, at, u)
	if r.also != "" {
		l.add(r.also, model, at, u)
	}
}

// meterRunning adds to the pending rows what each running use used since
// its last record. The caller holds l.mu.
func (l *Ledger) meterRunning(at time.Time) {
	for r := range l.running {
		now := r.meter()
		if now == r.recorded {
			continue
		}
		var requests int64
		if !r.counted {
			requests, r.counted = 1, true
		}
		u := rowOf(minus(now, r.recorded), requests)
		l.add(r.client, r.model, at, u)
		if r.also != "" {
			l.add(r.also, r.model, at, u)
		}
		r.recorded = now
	}
}

// minus returns a less b, field by field.
func minus(a, b Tokens) Tokens {
	return Tokens{Prompt: a.Prompt - b.Prompt, Completion: a.Completion - b.Completion, Cached: a.Cached - b.Cached,
		Reasoning: a.Reasoning - b.Reasoning, Cost: a.Cost - b.Cost}
}

// addPending adds u to the pending row k of m.
func addPending(m map[rowKey]*store.UsageRow, k rowKey, u store.UsageRow) {
	row := m[k]
	if row == nil {
		row = &store.UsageRow{Client: k.client, Day: k.at, Model: k.name}
		m[k] = row
	}
	row.Add(u)
}

// period is the name of the last day or slot a use was added in, kept
// so that adding formats a time once a period, not once a request.
type period struct {
	unix int64 // the period's first second
	name string
}

// nameOf returns format(t), formatting it only when t is in another
// period of step than the last: a check small enough to inline.
func (p *period) nameOf(t time.Time, step time.Duration, format func(time.Time) string) string {
	if unix := t.Unix(); unix >= p.unix && unix < p.unix+int64(step/time.Second) && p.name != "" {
		return p.name
	}
	return p.start(t, step, format)
}

// start makes the period of t the last.
func (p *period) start(t time.Time, step time.Duration, format func(time.Time) string) string {
	unix, seconds := t.Unix(), int64(step/time.Second)
	p.name = format(t)
	p.unix = unix - unix%seconds
	return p.name
}

// slotName returns store.Slot(t). The caller holds l.mu.
func (l *Ledger) slotName(t time.Time) string {
	return l.thisSlot.nameOf(t, store.SlotStep, store.Slot)
}

// dayName returns store.Day(t). The caller holds l.mu.
func (l *Ledger) dayName(t time.Time) string { return l.today.nameOf(t, 24*time.Hour, store.Day) }

// Attach gives the ledger its store when the service starts, and nil
// when it stops.
func (l *Ledger) Attach(st store.Backend) {
	l.mu.Lock()
	l.store = st
	l.mu.Unlock()
}

// Flush writes the batch that failed last time, if any, then the pending
// rows as a new batch. A failed batch is kept as it is for the next try;
// rows the store refused for good are set aside instead, so that they
// hold back nothing after them.
func (l *Ledger) Flush(ctx context.Context) error {
	l.flushing.Lock()
	defer l.flushing.Unlock()
	l.mu.Lock()
	st, unsure := l.store, l.unsure
	if unsure != nil && st != nil {
		l.beginWrite()
	}
	l.mu.Unlock()
	if st == nil {
		return nil
	}
	if unsure != nil {
		err := l.write(ctx, st, *unsure)
		l.mu.Lock()
		if err == nil {
			l.unsure = nil
		}
		l.endWrite()
		l.mu.Unlock()
		if err != nil {
			l.foldSlots(time.Now())
			return err
		}
	}

	l.mu.Lock()
	l.meterRunning(time.Now())
	if len(l.pending) == 0 && len(l.slots) == 0 && len(l.refusals) == 0 {
		l.mu.Unlock()
		return nil
	}
	l.seq++
	taken := store.UsageBatch{Writer: l.writer, Seq: l.seq, Rows: make([]store.UsageRow, 0, len(l.pending)), Slots: make([]store.UsageRow, 0, len(l.slots))}
	for _, row := range l.pending {
		taken.Rows = append(taken.Rows, *row)
	}
	for _, row := range l.slots {
		taken.Slots = append(taken.Slots, *row)
	}
	if len(l.refusals) > 0 {
		taken.SlotRefusals = make([]store.RefusalRow, 0, len(l.refusals))
		for k, n := range l.refusals {
			taken.SlotRefusals = append(taken.SlotRefusals, refusalRow(k, n))
		}
	}
	clear(l.pending)
	clear(l.slots)
	clear(l.refusals)
	l.writing = &taken
	l.beginWrite()
	l.mu.Unlock()
	// The hours sum every row; rows folded into their hour (see
	// foldSlots) are no slot's. Taken is the reads' until the write
	// ends, and stays as it is.
	b := taken
	b.Hours, b.Refusals = usageRows.hours(taken.Slots), refusalRows.hours(taken.SlotRefusals)
	b.Slots = slices.DeleteFunc(slices.Clone(taken.Slots), func(r store.UsageRow) bool { return !store.IsSlot(r.Day) })
	b.SlotRefusals = slices.DeleteFunc(slices.Clone(taken.SlotRefusals), func(r store.RefusalRow) bool { return !store.IsSlot(r.Hour) })

	err := l.write(ctx, st, b)
	l.mu.Lock()
	l.writing = nil
	if err != nil {
		l.unsure = &b
	}
	l.endWrite()
	l.mu.Unlock()
	return err
}

// beginWrite notes a write of the store in flight; the caller holds
// l.mu.
func (l *Ledger) beginWrite() { l.writeDone = make(chan struct{}) }

// endWrite notes that the write in flight ended, its rows in the store
// or unsure; the caller holds l.mu.
func (l *Ledger) endWrite() {
	close(l.writeDone)
	l.writeDone = nil
	l.moves++
}

// foldSlots turns the pending 5-minute rows of the slots before the
// last two into rows of their hour, while the store cannot be written:
// their hours are still written once it can be, but however long it
// fails the pending 5-minute rows are at most two slots' worth, and the
// rest grow by the hour, as the hourly rows did before there were
// slots.
func (l *Ledger) foldSlots(now time.Time) {
	keep := store.Slot(now.Add(-store.SlotStep))
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, row := range l.slots {
		if !store.IsSlot(k.at) || k.at >= keep {
			continue // an hour's row already (even one added in this loop), or a recent slot's
		}
		delete(l.slots, k)
		addPending(l.slots, rowKey{k.client, hourOf(k.at), k.name}, *row)
	}
	for k, n := range l.refusals {
		if !store.IsSlot(k.at) || k.at >= keep {
			continue
		}
		delete(l.refusals, k)
		h := rowKey{k.client, hourOf(k.at), k.name}
		l.refusals[h] = store.AddCount(l.refusals[h], n)
	}
}

// write writes b to st. Rows the store refused for good are logged, with
// every figure an operator needs to add them by hand, and count as
// written.
func (l *Ledger) write(ctx context.Context, st store.Backend, b store.UsageBatch) error {
	err := st.AddUsage(ctx, b)
	var refused *store.RefusedError
	if !errors.As(err, &refused) {
		return err
	}
	l.logger.Error("usage the store refuses, set aside: add these rows to the ledger by hand",
		zap.Any("rows", refused.Rows), zap.Any("refusals", refused.Refusals), zap.Error(refused.Err))
	return nil
}

// Retrying returns the daily rows of the batch whose write failed,
// which the next flush writes again as it was, before anything newer;
// nil when there is none. For tests and diagnostics.
func (l *Ledger) Retrying() []store.UsageRow {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.unsure == nil {
		return nil
	}
	return slices.Clone(l.unsure.Rows)
}

// QuotaUsed returns the tokens the client used since a time (a quota
// period's start), for limiter.QuotaCounter.
func (l *Ledger) QuotaUsed(ctx context.Context, client string, since time.Time) (int64, error) {
	return l.sumSince(ctx, client, since, store.UsageRow.TotalTokens)
}

// CostUsed returns what the client spent since a time (a budget period's
// start), in micro-units of the currency: the sum of its rows' cost,
// stopping at the largest int64.
func (l *Ledger) CostUsed(ctx context.Context, client string, since time.Time) (int64, error) {
	return l.sumSince(ctx, client, since, func(r store.UsageRow) int64 { return r.Cost })
}

// sumSince sums a figure of the client's rows since a time, stopping at
// the largest int64.
func (l *Ledger) sumSince(ctx context.Context, client string, since time.Time, figure func(store.UsageRow) int64) (int64, error) {
	rows, err := l.UsageSince(ctx, client, since)
	var total int64
	for _, r := range rows {
		total = store.AddCount(total, figure(r))
	}
	return total, err
}
