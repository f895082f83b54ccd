package keystore

import (
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
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
func (t Tokens) Total() int64 { return addCount(t.Prompt, t.Completion) }

// UsageRow is one client's usage of one model on one UTC day.
type UsageRow struct {
	Client           string
	Day              string // YYYY-MM-DD, UTC
	Model            string
	Requests         int64
	PromptTokens     int64
	CompletionTokens int64
	CachedTokens     int64 // of PromptTokens, where the upstream said
	ReasoningTokens  int64 // of CompletionTokens, where the upstream said
	Cost             int64 // micro-units of the currency, at the prices when each use was added
}

// TotalTokens returns prompt plus completion tokens.
func (r UsageRow) TotalTokens() int64 { return addCount(r.PromptTokens, r.CompletionTokens) }

// Add adds the counts of o to r's. Every count stops at the largest
// int64: a figure that large is wrong already, and must not wrap into a
// negative one that starts a quota over.
func (r *UsageRow) Add(o UsageRow) {
	r.Requests = addCount(r.Requests, o.Requests)
	r.PromptTokens = addCount(r.PromptTokens, o.PromptTokens)
	r.CompletionTokens = addCount(r.CompletionTokens, o.CompletionTokens)
	r.CachedTokens = addCount(r.CachedTokens, o.CachedTokens)
	r.ReasoningTokens = addCount(r.ReasoningTokens, o.ReasoningTokens)
	r.Cost = addCount(r.Cost, o.Cost)
}

// addCount returns a+b, saturating at the bounds of int64.
func addCount(a, b int64) int64 {
	sum := a + b
	if (sum > a) != (b > 0) { // wrapped
		if b > 0 {
			return math.MaxInt64
		}
		return math.MinInt64
	}
	return sum
}

// UsageBatch is one write of the ledger: its rows, and which write of
// which ledger it is. A write whose answer was lost (a connection that
// broke after the store applied it) is retried as the same batch, and a
// store that can lose answers applies it only once.
type UsageBatch struct {
	Writer string // the ledger's own random ID
	Seq    uint64 // grows with each new batch of the writer
	Rows   []UsageRow
	// Hours are the same uses by hour: each row's Day holds its UTC
	// hour, YYYY-MM-DDTHH (see Hour). A store keeps them HourRetention.
	Hours []UsageRow
	// Refusals are the refused requests of the same time, by hour
	// only: kept HourRetention as the Hours.
	Refusals []RefusalRow
	// Slots are the same uses by 5-minute slot: each row's Day holds
	// its UTC slot, YYYY-MM-DDTHH:MM (see Slot). A store keeps them
	// SlotRetention.
	Slots []UsageRow
	// SlotRefusals are the Refusals by 5-minute slot: each row's Hour
	// holds its slot. Kept SlotRetention as the Slots.
	SlotRefusals []RefusalRow
}

// UsageStore is where the ledger's rows live. A Store that can also keep
// usage implements it.
type UsageStore interface {
	// AddUsage adds the batch's rows to the stored ones, in one
	// transaction, once: a batch of the writer's that is not newer than
	// the last applied is ignored. Rows that can never be stored are
	// left out and returned in a *RefusedError, the rest written; any
	// other error leaves the batch to be written again as it is.
	AddUsage(ctx context.Context, b UsageBatch) error
	// UsageSince returns the client's rows of day and later.
	UsageSince(ctx context.Context, client, day string) ([]UsageRow, error)
}

// RefusedError is the error of AddUsage when the store refused rows for
// good: the rows themselves cannot be stored (a constraint or a type error
// in SQLite, a usage hash of another type in Redis, a script that fails on
// them), so writing them again would fail again. The rest of the batch
// was written.
type RefusedError struct {
	Rows     []UsageRow
	Refusals []RefusalRow
	Err      error // why
}

func (e *RefusedError) Error() string {
	if len(e.Refusals) > 0 {
		return fmt.Sprintf("the store refused %d usage rows and %d refusal rows: %v", len(e.Rows), len(e.Refusals), e.Err)
	}
	return fmt.Sprintf("the store refused %d usage rows: %v", len(e.Rows), e.Err)
}

func (e *RefusedError) Unwrap() error { return e.Err }

type ledgerKey struct{ client, day, model string }

// Ledger counts usage per client, model and UTC day. Adding is in memory;
// the rows are written in batches, at most flushEvery behind, and on Stop.
// Readers see stored and pending rows together, so nothing is missing
// from a quota or a usage answer while a batch waits.
//
// The zero Ledger is not usable; a Service makes one. It is safe for
// concurrent use.
type Ledger struct {
	flushing sync.Mutex // one flush at a time, so batches reach the store in order
	logger   *zap.Logger
	mu       sync.Mutex // protects the fields below
	pending  map[ledgerKey]*UsageRow
	// slots are the pending uses by 5-minute slot (day holds the slot),
	// and refusals the pending refusals by slot: a flush writes them,
	// and the same summed by hour. They hold the rows of one flush
	// interval; while the store fails, those of the slots before the
	// last two are folded into their hour (see foldSlots).
	slots    map[ledgerKey]*UsageRow
	refusals map[refusalKey]int64
	// running are the uses recorded as they go (see Begin).
	running map[*Running]struct{}
	// unsure is a batch whose write failed: it may or may not have been
	// applied, so it is written again as it is, before anything newer.
	unsure *UsageBatch
	writer string
	seq    uint64     // of the last batch made
	store  UsageStore // nil until the service starts
	// today is the name of the last day a use was added on, kept so
	// that adding formats a date once a day, not once a request.
	today struct {
		unix int64 // the day's first second
		name string
	}
	thisSlot struct {
		unix int64 // the slot's first second
		name string
	}
}

func newLedger(logger *zap.Logger) *Ledger {
	return &Ledger{pending: make(map[ledgerKey]*UsageRow), slots: make(map[ledgerKey]*UsageRow),
		refusals: make(map[refusalKey]int64), running: make(map[*Running]struct{}),
		writer: rand.Text(), logger: logger}
}

// Day formats t as the ledger's UTC day.
func Day(t time.Time) string { return t.UTC().Format(time.DateOnly) }

// Add counts one request of client for model at t, which used tokens.
func (l *Ledger) Add(client, model string, at time.Time, used Tokens) {
	l.mu.Lock()
	l.add(client, model, at, rowOf(used, 1))
	l.mu.Unlock()
}

// add adds u to the pending rows of client and model at t. The caller
// holds l.mu.
func (l *Ledger) add(client, model string, at time.Time, u UsageRow) {
	addPending(l.pending, ledgerKey{client, l.dayName(at), model}, u)
	addPending(l.slots, ledgerKey{client, l.slotName(at), model}, u)
}

func rowOf(t Tokens, requests int64) UsageRow {
	return UsageRow{Requests: requests, PromptTokens: t.Prompt, CompletionTokens: t.Completion,
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
func addPending(m map[ledgerKey]*UsageRow, k ledgerKey, u UsageRow) {
	row := m[k]
	if row == nil {
		row = &UsageRow{Client: k.client, Day: k.day, Model: k.model}
		m[k] = row
	}
	row.Add(u)
}

// slotName returns Slot(t), formatting it only when t is in another
// slot than the last. The caller holds l.mu.
func (l *Ledger) slotName(t time.Time) string {
	const secondsPerSlot = int64(SlotStep / time.Second)
	unix := t.Unix()
	if start := l.thisSlot.unix; unix < start || unix >= start+secondsPerSlot || l.thisSlot.name == "" {
		l.thisSlot.name = Slot(t)
		l.thisSlot.unix = unix - unix%secondsPerSlot
	}
	return l.thisSlot.name
}

// dayName returns Day(t), formatting it only when t is on another day
// than the last. The caller holds l.mu.
func (l *Ledger) dayName(t time.Time) string {
	const secondsPerDay = 24 * 60 * 60
	unix := t.Unix()
	if start := l.today.unix; unix < start || unix >= start+secondsPerDay || l.today.name == "" {
		l.today.name = Day(t)
		l.today.unix = unix - unix%secondsPerDay
	}
	return l.today.name
}

// attach gives the ledger its store when the service starts.
func (l *Ledger) attach(st UsageStore) {
	l.mu.Lock()
	l.store = st
	l.mu.Unlock()
}

// flush writes the batch that failed last time, if any, then the pending
// rows as a new batch. A failed batch is kept as it is for the next try;
// rows the store refused for good are set aside instead, so that they
// hold back nothing after them.
func (l *Ledger) flush(ctx context.Context) error {
	l.flushing.Lock()
	defer l.flushing.Unlock()
	l.mu.Lock()
	st, unsure := l.store, l.unsure
	l.mu.Unlock()
	if st == nil {
		return nil
	}
	if unsure != nil {
		if err := l.write(ctx, st, *unsure); err != nil {
			l.foldSlots(time.Now())
			return err
		}
		l.mu.Lock()
		l.unsure = nil
		l.mu.Unlock()
	}

	l.mu.Lock()
	l.meterRunning(time.Now())
	if len(l.pending) == 0 && len(l.slots) == 0 && len(l.refusals) == 0 {
		l.mu.Unlock()
		return nil
	}
	l.seq++
	b := UsageBatch{Writer: l.writer, Seq: l.seq, Rows: make([]UsageRow, 0, len(l.pending)), Slots: make([]UsageRow, 0, len(l.slots))}
	for _, row := range l.pending {
		b.Rows = append(b.Rows, *row)
	}
	for _, row := range l.slots {
		b.Slots = append(b.Slots, *row)
	}
	if len(l.refusals) > 0 {
		b.SlotRefusals = make([]RefusalRow, 0, len(l.refusals))
		for k, n := range l.refusals {
			b.SlotRefusals = append(b.SlotRefusals, RefusalRow{Client: k.client, Hour: k.hour, Reason: k.reason, Count: n})
		}
	}
	clear(l.pending)
	clear(l.slots)
	clear(l.refusals)
	l.mu.Unlock()
	// The hours sum every row; rows folded into their hour (see
	// foldSlots) are no slot's.
	b.Hours, b.Refusals = hoursOfSlots(b.Slots), refusalHoursOfSlots(b.SlotRefusals)
	b.Slots = slices.DeleteFunc(b.Slots, func(r UsageRow) bool { return !isSlot(r.Day) })
	b.SlotRefusals = slices.DeleteFunc(b.SlotRefusals, func(r RefusalRow) bool { return !isSlot(r.Hour) })

	err := l.write(ctx, st, b)
	if err != nil {
		l.mu.Lock()
		l.unsure = &b
		l.mu.Unlock()
	}
	return err
}

// foldSlots turns the pending 5-minute rows of the slots before the
// last two into rows of their hour, while the store cannot be written:
// their hours are still written once it can be, but however long it
// fails the pending 5-minute rows are at most two slots' worth, and the
// rest grow by the hour, as the hourly rows did before there were
// slots.
func (l *Ledger) foldSlots(now time.Time) {
	keep := Slot(now.Add(-SlotStep))
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, row := range l.slots {
		if !isSlot(k.day) || k.day >= keep {
			continue // an hour's row already (even one added in this loop), or a recent slot's
		}
		delete(l.slots, k)
		r := *row
		r.Day = k.day[:len(hourLayout)]
		addPending(l.slots, ledgerKey{k.client, r.Day, k.model}, r)
	}
	for k, n := range l.refusals {
		if !isSlot(k.hour) || k.hour >= keep {
			continue
		}
		delete(l.refusals, k)
		h := refusalKey{k.client, k.hour[:len(hourLayout)], k.reason}
		l.refusals[h] = addCount(l.refusals[h], n)
	}
}

// write writes b to st. Rows the store refused for good are logged, with
// every figure an operator needs to add them by hand, and count as
// written.
func (l *Ledger) write(ctx context.Context, st UsageStore, b UsageBatch) error {
	err := st.AddUsage(ctx, b)
	var refused *RefusedError
	if !errors.As(err, &refused) {
		return err
	}
	l.logger.Error("usage the store refuses, set aside: add these rows to the ledger by hand",
		zap.Any("rows", refused.Rows), zap.Any("refusals", refused.Refusals), zap.Error(refused.Err))
	return nil
}

// UsageSince returns the client's rows since day (inclusive), stored and
// pending together, ordered by day and model.
func (l *Ledger) UsageSince(ctx context.Context, client string, since time.Time) ([]UsageRow, error) {
	day := Day(since)
	l.mu.Lock()
	st := l.store
	var pending []UsageRow
	for k, row := range l.pending {
		if k.client == client && k.day >= day {
			pending = append(pending, *row)
		}
	}
	// A batch that may have been applied counts until it is known: a
	// moment of counting it twice rather than not at all.
	if l.unsure != nil {
		for _, row := range l.unsure.Rows {
			if row.Client == client && row.Day >= day {
				pending = append(pending, row)
			}
		}
	}
	l.mu.Unlock()
	if st == nil {
		return nil, errors.New("the usage ledger is not open")
	}
	rows, err := st.UsageSince(ctx, client, day)
	if err != nil {
		return nil, err
	}
	rows = merge(rows, pending)
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].Day != rows[j].Day {
			return rows[i].Day < rows[j].Day
		}
		return rows[i].Model < rows[j].Model
	})
	return rows, nil
}

// QuotaUsed returns the tokens the client used since a time (a quota
// period's start), for limiter.QuotaCounter.
func (l *Ledger) QuotaUsed(ctx context.Context, client string, since time.Time) (int64, error) {
	return l.sumSince(ctx, client, since, UsageRow.TotalTokens)
}

// CostUsed returns what the client spent since a time (a budget period's
// start), in micro-units of the currency: the sum of its rows' cost,
// stopping at the largest int64.
func (l *Ledger) CostUsed(ctx context.Context, client string, since time.Time) (int64, error) {
	return l.sumSince(ctx, client, since, func(r UsageRow) int64 { return r.Cost })
}

// sumSince sums a figure of the client's rows since a time, stopping at
// the largest int64.
func (l *Ledger) sumSince(ctx context.Context, client string, since time.Time, figure func(UsageRow) int64) (int64, error) {
	rows, err := l.UsageSince(ctx, client, since)
	var total int64
	for _, r := range rows {
		total = addCount(total, figure(r))
	}
	return total, err
}

func merge(rows, pending []UsageRow) []UsageRow {
	for _, p := range pending {
		found := false
		for i := range rows {
			if rows[i].Day == p.Day && rows[i].Model == p.Model {
				rows[i].Add(p)
				found = true
				break
			}
		}
		if !found {
			rows = append(rows, p)
		}
	}
	return rows
}

// ledgerSchema is the SQLite migration that adds the usage ledger.
const ledgerSchema = `CREATE TABLE usage (
		client            TEXT NOT NULL,
		day               TEXT NOT NULL,
		model             TEXT NOT NULL,
		requests          INTEGER NOT NULL,
		prompt_tokens     INTEGER NOT NULL,
		completion_tokens INTEGER NOT NULL,
		PRIMARY KEY (client, day, model)
	) STRICT, WITHOUT ROWID;`

// ledgerDetailsSchema is the SQLite migration that keeps the cached and
// reasoning tokens of the usage; the rows from before count none.
const ledgerDetailsSchema = `ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE usage ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;`

// ledgerCostSchema is the SQLite migration that keeps the cost of the
// usage, in micro-units of the currency; the rows from before cost
// nothing.
const ledgerCostSchema = `ALTER TABLE usage ADD COLUMN cost INTEGER NOT NULL DEFAULT 0;`

// addUsageSQL adds a row to the ledger, each sum at most the largest
// int64: SQLite turns a sum that overflows into a REAL, which the STRICT
// table refuses, and the row could never be written.
var addUsageSQL = `INSERT INTO usage (client, day, model, requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost)
	VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
	ON CONFLICT (client, day, model) DO UPDATE SET ` +
	saturatingSum("requests") + ", " + saturatingSum("prompt_tokens") + ", " + saturatingSum("completion_tokens") + ", " +
	saturatingSum("cached_tokens") + ", " + saturatingSum("reasoning_tokens") + ", " + saturatingSum("cost")

// saturatingSum is the SQL that adds the new row's column to the stored
// one. A count is never negative, so the test itself cannot overflow.
func saturatingSum(column string) string {
	return fmt.Sprintf("%[1]s = CASE WHEN excluded.%[1]s > %[2]d - %[1]s THEN %[2]d ELSE %[1]s + excluded.%[1]s END", column, math.MaxInt64)
}

// AddUsage implements UsageStore. A transaction that failed was not
// applied, so a batch written again cannot count twice: the writer and
// sequence are not needed here. A row SQLite refuses (see refusesRow)
// is left out of the transaction, and the rest written.
func (s *SQLite) AddUsage(ctx context.Context, b UsageBatch) error {
	var refused []UsageRow
	var refusals []RefusalRow
	var why error
	err := s.write(ctx, func(tx *sql.Tx) error {
		stmt, err := tx.PrepareContext(ctx, addUsageSQL)
		if err != nil {
			return err
		}
		defer stmt.Close()
		for _, r := range b.Rows {
			_, err := stmt.ExecContext(ctx, r.Client, r.Day, r.Model, r.Requests, r.PromptTokens, r.CompletionTokens, r.CachedTokens, r.ReasoningTokens, r.Cost)
			switch {
			case err == nil:
			case refusesRow(err):
				refused, why = append(refused, r), err
			default:
				return fmt.Errorf("writing usage: %w", err)
			}
		}
		hours, whyHours, err := addHours(ctx, tx, b.Hours, time.Now())
		if err != nil {
			return err
		}
		if len(hours) > 0 {
			refused, why = append(refused, hours...), whyHours
		}
		var whyRefusals error
		refusals, whyRefusals, err = addRefusals(ctx, tx, b.Refusals, time.Now())
		if err != nil {
			return err
		}
		if len(refusals) > 0 {
			why = whyRefusals
		}
		slots, slotRefusals, whySlots, err := addSlots(ctx, tx, b.Slots, b.SlotRefusals, time.Now())
		if err != nil {
			return err
		}
		if len(slots)+len(slotRefusals) > 0 {
			refused, refusals, why = append(refused, slots...), append(refusals, slotRefusals...), whySlots
		}
		return nil
	})
	if err == nil && len(refused)+len(refusals) > 0 {
		return &RefusedError{Rows: refused, Refusals: refusals, Err: fmt.Errorf("writing usage: %w", why)}
	}
	return err
}

// refusesRow reports whether err is SQLite refusing the values of a row
// (a constraint, a type, a value too big or out of range), which writing
// it again would not change. A failed statement leaves its transaction
// as it was. A busy, locked, full or failing database is waited out.
func refusesRow(err error) bool {
	var e *sqlite.Error
	if !errors.As(err, &e) {
		return false
	}
	switch e.Code() & 0xff { // the primary result code
	case sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_MISMATCH, sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_RANGE:
		return true
	}
	return false
}

// UsageSince implements UsageStore.
func (s *SQLite) UsageSince(ctx context.Context, client, day string) ([]UsageRow, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT day, model, requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost
		FROM usage WHERE client = ? AND day >= ? ORDER BY day, model`, client, day)
	if err != nil {
		return nil, fmt.Errorf("reading usage: %w", err)
	}
	defer rows.Close()
	var out []UsageRow
	for rows.Next() {
		r := UsageRow{Client: client}
		if err := rows.Scan(&r.Day, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens, &r.CachedTokens, &r.ReasoningTokens, &r.Cost); err != nil {
			return nil, fmt.Errorf("reading usage: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}
