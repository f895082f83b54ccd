package ledger

import (
	"cmp"
	"context"
	"errors"
	"iter"
	"slices"
	"strings"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// rowKind is how the ledger's reads handle one type of row, usage or
// refusals: their fields that name a row, how one is added to another,
// and how a row's time is set.
type rowKind[R any] struct {
	key   func(R) rowKey
	add   func(*R, R)
	setAt func(R, string) R
}

var usageRows = rowKind[store.UsageRow]{
	key:   func(r store.UsageRow) rowKey { return rowKey{r.Client, r.Day, r.Model} },
	add:   (*store.UsageRow).Add,
	setAt: func(r store.UsageRow, at string) store.UsageRow { r.Day = at; return r },
}

var refusalRows = rowKind[store.RefusalRow]{
	key:   func(r store.RefusalRow) rowKey { return rowKey{r.Client, r.Hour, r.Reason} },
	add:   func(r *store.RefusalRow, p store.RefusalRow) { r.Count = store.AddCount(r.Count, p.Count) },
	setAt: func(r store.RefusalRow, at string) store.RefusalRow { r.Hour = at; return r },
}

// refusalRow is the pending refusal row of k, counting n.
func refusalRow(k rowKey, n int64) store.RefusalRow {
	return store.RefusalRow{Client: k.client, Hour: k.at, Reason: k.name, Count: n}
}

// hourOf is the hour of a slot (or of an hour).
func hourOf(at string) string { return at[:len(store.HourLayout)] }

// hour returns r with its slot made its hour.
func (k rowKind[R]) hour(r R) R {
	return k.setAt(r, hourOf(k.key(r).at))
}

// merge adds the pending rows to the stored ones and sorts them by
// time, client and model or reason. It is the one merge of the ledger's
// reads.
func (k rowKind[R]) merge(rows, pending []R) []R {
	if len(pending) > 0 {
		rows = k.sum(rows, pending, false)
	}
	slices.SortFunc(rows, func(a, b R) int {
		x, y := k.key(a), k.key(b)
		return cmp.Or(strings.Compare(x.at, y.at), strings.Compare(x.client, y.client), strings.Compare(x.name, y.name))
	})
	return rows
}

// hours sums rows by 5-minute slot by hour, for a batch's Hours and
// Refusals.
func (k rowKind[R]) hours(slots []R) []R {
	if len(slots) == 0 {
		return nil
	}
	return k.sum(make([]R, 0, len(slots)), slots, true)
}

// sum adds each of more (made hours first, if hour) to the row of rows
// of its key, or appends it: rows hold one row a key.
func (k rowKind[R]) sum(rows, more []R, hour bool) []R {
	at := make(map[rowKey]int, len(rows)+len(more))
	for i, r := range rows {
		at[k.key(r)] = i
	}
	for _, r := range more {
		if hour {
			r = k.hour(r)
		}
		key := k.key(r)
		if i, ok := at[key]; ok {
			k.add(&rows[i], r)
			continue
		}
		at[key] = len(rows)
		rows = append(rows, r)
	}
	return rows
}

// errNotOpen is the error of a read before the service started.
var errNotOpen = errors.New("the usage ledger is not open")

// read is one read of the ledger: the rows of client (of every client
// when every) since a time, stored and pending together. The zero value
// reads nothing; the ledger's reads are the variables below.
type read[R any] struct {
	kind   rowKind[R]
	client string
	every  bool   // every client's rows, not only client's
	since  string // a day, hour or slot: the rows of it and later
	hours  bool   // the pending rows are by slot: sum them by hour
	slots  bool   // only 5-minute rows, not the hours foldSlots made
	// stored reads the store's rows, such as store.Backend.UsageHours.
	stored func(st store.Backend, ctx context.Context, client, since string) ([]R, error)
	// pending are the ledger's pending rows and those of the batch being
	// written, as they were taken; the caller holds l.mu.
	pending func(l *Ledger) iter.Seq[R]
	// retried are the rows of the batch that may have been applied.
	retried func(b store.UsageBatch) []R
}

// Reads start again at most readTries times because a write ended while
// they read, and wait at most writeWait for a write in flight: a write
// takes milliseconds, and one stalled longer is no reason to hold a
// read, which then counts it with the pending rows.
const (
	readTries = 3
	writeWait = 250 * time.Millisecond
)

// do reads the stored rows and adds the pending ones that the read
// wants, and those of the batch being written or unsure, so that no use
// is missing. A write that ends while the store is read may or may not
// be in what it returned: the read starts again, once the write in
// flight, if any, ended. Only a batch whose write failed or is stalled
// may count twice for a moment, never less.
func (r *read[R]) do(ctx context.Context, l *Ledger) ([]R, error) {
	for try := 1; ; try++ {
		waited := l.waitWrite(ctx)
		l.mu.Lock()
		st, moves := l.store, l.moves
		p := r.pendingRows(l)
		l.mu.Unlock()
		if st == nil {
			return nil, errNotOpen
		}
		rows, err := r.stored(st, ctx, r.client, r.since)
		if err != nil {
			return nil, err
		}
		l.mu.Lock()
		settled := l.moves == moves && l.writeDone == nil
		l.mu.Unlock()
		if settled || !waited || try == readTries {
			return r.kind.merge(rows, p), nil
		}
	}
}

// pendingRows are the rows the read wants of those not known to be in
// the store: pending, being written, or unsure. The caller holds l.mu.
func (r *read[R]) pendingRows(l *Ledger) []R {
	var p []R
	for row := range r.pending(l) {
		if r.hours {
			row = r.kind.hour(row)
		}
		p = r.keep(p, row)
	}
	if l.unsure != nil {
		for _, row := range r.retried(*l.unsure) {
			p = r.keep(p, row)
		}
	}
	return p
}

// waitWrite waits for the write in flight, if any, at most writeWait;
// false when it had not ended.
func (l *Ledger) waitWrite(ctx context.Context) bool {
	l.mu.Lock()
	done := l.writeDone
	l.mu.Unlock()
	if done == nil {
		return true
	}
	t := time.NewTimer(writeWait)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	return false
}

// keep appends row to rows if the read wants it.
func (r *read[R]) keep(rows []R, row R) []R {
	k := r.kind.key(row)
	if (r.every || k.client == r.client) && k.at >= r.since && (!r.slots || store.IsSlot(k.at)) {
		rows = append(rows, row)
	}
	return rows
}

// usageIn yields the rows of m (l.pending or l.slots), then those of
// the same kind in the batch being written (its Rows or Slots).
func usageIn(l *Ledger, m map[rowKey]*store.UsageRow, writing func(*store.UsageBatch) []store.UsageRow) iter.Seq[store.UsageRow] {
	return func(yield func(store.UsageRow) bool) {
		for _, row := range m {
			if !yield(*row) {
				return
			}
		}
		if l.writing != nil {
			for _, row := range writing(l.writing) {
				if !yield(row) {
					return
				}
			}
		}
	}
}

// refusalsIn yields the pending refusal rows, by slot, then those of the
// batch being written.
func refusalsIn(l *Ledger) iter.Seq[store.RefusalRow] {
	return func(yield func(store.RefusalRow) bool) {
		for k, n := range l.refusals {
			if !yield(refusalRow(k, n)) {
				return
			}
		}
		if l.writing != nil {
			for _, row := range l.writing.SlotRefusals {
				if !yield(row) {
					return
				}
			}
		}
	}
}

func days(l *Ledger) iter.Seq[store.UsageRow] {
	return usageIn(l, l.pending, func(b *store.UsageBatch) []store.UsageRow { return b.Rows })
}

func slots(l *Ledger) iter.Seq[store.UsageRow] {
	return usageIn(l, l.slots, func(b *store.UsageBatch) []store.UsageRow { return b.Slots })
}

// The ledger's reads, but for whose rows and since when (see of).
var (
	usageDays = read[store.UsageRow]{kind: usageRows, stored: store.Backend.UsageSince, pending: days,
		retried: func(b store.UsageBatch) []store.UsageRow { return b.Rows }}
	usageHours = read[store.UsageRow]{kind: usageRows, hours: true, stored: store.Backend.UsageHours, pending: slots,
		retried: func(b store.UsageBatch) []store.UsageRow { return b.Hours }}
	usageSlots = read[store.UsageRow]{kind: usageRows, slots: true, stored: store.Backend.UsageSlots, pending: slots,
		retried: func(b store.UsageBatch) []store.UsageRow { return b.Slots }}
	refusalHours = read[store.RefusalRow]{kind: refusalRows, hours: true, stored: store.Backend.RefusalHours, pending: refusalsIn,
		retried: func(b store.UsageBatch) []store.RefusalRow { return b.Refusals }}
	refusalSlots = read[store.RefusalRow]{kind: refusalRows, slots: true, stored: store.Backend.RefusalSlots, pending: refusalsIn,
		retried: func(b store.UsageBatch) []store.RefusalRow { return b.SlotRefusals }}
)

// of reads the rows of client since since (a day, hour or slot); every
// client's for "" but in a read by day.
func (r read[R]) of(ctx context.Context, l *Ledger, client, since string) ([]R, error) {
	r.client, r.since = client, since
	r.every = client == "" && (r.hours || r.slots)
	return r.do(ctx, l)
}

// UsageSince returns the client's rows since day (inclusive), stored and
// pending together, ordered by day and model.
func (l *Ledger) UsageSince(ctx context.Context, client string, since time.Time) ([]store.UsageRow, error) {
	return usageDays.of(ctx, l, client, store.Day(since))
}

// Hours returns the hourly rows (Day holding the UTC hour) since the
// hour of since, stored and pending together, of every client when
// client is "", ordered by hour, client and model. Rows older than
// store.HourRetention are gone.
func (l *Ledger) Hours(ctx context.Context, client string, since time.Time) ([]store.UsageRow, error) {
	return usageHours.of(ctx, l, client, store.Hour(since))
}

// Slots returns the 5-minute rows (Day holding the UTC slot) since the
// slot of since, as Hours does the hours; rows older than
// store.SlotRetention are gone.
func (l *Ledger) Slots(ctx context.Context, client string, since time.Time) ([]store.UsageRow, error) {
	return usageSlots.of(ctx, l, client, store.Slot(since))
}

// RefusalHours returns the refusals by hour since the hour of since,
// stored and pending together, of every client when client is "",
// ordered by hour, client and reason. Rows older than
// store.HourRetention are gone.
func (l *Ledger) RefusalHours(ctx context.Context, client string, since time.Time) ([]store.RefusalRow, error) {
	return refusalHours.of(ctx, l, client, store.Hour(since))
}

// RefusalSlots returns the refusals by 5-minute slot (Hour holding the
// slot) since the slot of since, as RefusalHours does the hours; rows
// older than store.SlotRetention are gone.
func (l *Ledger) RefusalSlots(ctx context.Context, client string, since time.Time) ([]store.RefusalRow, error) {
	return refusalSlots.of(ctx, l, client, store.Slot(since))
}
