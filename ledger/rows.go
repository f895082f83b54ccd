package ledger

import (
	"cmp"
	"context"
	"errors"
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
	setAt func(*R, string)
}

var usageRows = rowKind[store.UsageRow]{
	key:   func(r store.UsageRow) rowKey { return rowKey{r.Client, r.Day, r.Model} },
	add:   (*store.UsageRow).Add,
	setAt: func(r *store.UsageRow, at string) { r.Day = at },
}

var refusalRows = rowKind[store.RefusalRow]{
	key:   func(r store.RefusalRow) rowKey { return rowKey{r.Client, r.Hour, r.Reason} },
	add:   func(r *store.RefusalRow, p store.RefusalRow) { r.Count = store.AddCount(r.Count, p.Count) },
	setAt: func(r *store.RefusalRow, at string) { r.Hour = at },
}

// refusalRow is the pending refusal row of k, counting n.
func refusalRow(k rowKey, n int64) store.RefusalRow {
	return store.RefusalRow{Client: k.client, Hour: k.at, Reason: k.name, Count: n}
}

// hourOf is the hour of a slot (or of an hour).
func hourOf(at string) string { return at[:len(store.HourLayout)] }

// hour returns r with its slot made its hour.
func (k rowKind[R]) hour(r R) R {
	k.setAt(&r, hourOf(k.key(r).at))
	return r
}

// merge adds the pending rows to the stored ones (a row of a stored
// one's key to its sum, the others after them) and sorts them by time,
// client and model or reason. It is the one merge of the ledger's reads.
func (k rowKind[R]) merge(rows, pending []R) []R {
	if len(pending) > 0 {
		at := make(map[rowKey]int, len(rows))
		for i, r := range rows {
			at[k.key(r)] = i
		}
		for _, p := range pending {
			key := k.key(p)
			if i, ok := at[key]; ok {
				k.add(&rows[i], p)
				continue
			}
			at[key] = len(rows)
			rows = append(rows, p)
		}
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
	hours := make([]R, len(slots))
	for i, r := range slots {
		hours[i] = k.hour(r)
	}
	return k.merge(hours[:0:0], hours)
}

// errNotOpen is the error of a read before the service started.
var errNotOpen = errors.New("the usage ledger is not open")

// read is one read of the ledger: the rows of client (of every client
// when every) since a time, stored and pending together.
type read[R any] struct {
	kind   rowKind[R]
	client string
	every  bool   // every client's rows, not only client's
	since  string // a day, hour or slot: the rows of it and later
	slots  bool   // only 5-minute rows, not the hours foldSlots made
}

// keep appends row to rows if the read wants it.
func (r *read[R]) keep(rows []R, row R) []R {
	k := r.kind.key(row)
	if (r.every || k.client == r.client) && k.at >= r.since && (!r.slots || store.IsSlot(k.at)) {
		rows = append(rows, row)
	}
	return rows
}

// do reads the stored rows with stored and adds the pending ones, which
// pending picks (with keep) under the ledger's lock from its pending
// rows and the batch that may have been applied. Such a batch counts
// until it is known: a moment of counting it twice rather than not at
// all.
func (r *read[R]) do(l *Ledger, stored func(store.Backend) ([]R, error), pending func(unsure store.UsageBatch) []R) ([]R, error) {
	l.mu.Lock()
	st := l.store
	var unsure store.UsageBatch
	if l.unsure != nil {
		unsure = *l.unsure
	}
	p := pending(unsure)
	l.mu.Unlock()
	if st == nil {
		return nil, errNotOpen
	}
	rows, err := stored(st)
	if err != nil {
		return nil, err
	}
	return r.kind.merge(rows, p), nil
}

// keepAll appends the rows of list that the read wants.
func (r *read[R]) keepAll(rows, list []R) []R {
	for _, row := range list {
		rows = r.keep(rows, row)
	}
	return rows
}

// Hours returns the hourly rows (Day holding the UTC hour) since the
// hour of since, stored and pending together, of every client when
// client is "", ordered by hour, client and model. Rows older than
// store.HourRetention are gone.
func (l *Ledger) Hours(ctx context.Context, client string, since time.Time) ([]store.UsageRow, error) {
	r := &read[store.UsageRow]{kind: usageRows, client: client, every: client == "", since: store.Hour(since)}
	return r.do(l, func(st store.Backend) ([]store.UsageRow, error) { return st.UsageHours(ctx, client, r.since) },
		func(u store.UsageBatch) (p []store.UsageRow) {
			for _, row := range l.slots {
				p = r.keep(p, usageRows.hour(*row))
			}
			return r.keepAll(p, u.Hours)
		})
}

// Slots returns the 5-minute rows (Day holding the UTC slot) since the
// slot of since, stored and pending together, of every client when
// client is "", ordered by slot, client and model. Rows older than
// store.SlotRetention are gone.
func (l *Ledger) Slots(ctx context.Context, client string, since time.Time) ([]store.UsageRow, error) {
	r := &read[store.UsageRow]{kind: usageRows, client: client, every: client == "", since: store.Slot(since), slots: true}
	return r.do(l, func(st store.Backend) ([]store.UsageRow, error) { return st.UsageSlots(ctx, client, r.since) },
		func(u store.UsageBatch) (p []store.UsageRow) {
			for _, row := range l.slots {
				p = r.keep(p, *row)
			}
			return r.keepAll(p, u.Slots)
		})
}

// RefusalHours returns the refusals by hour since the hour of since,
// stored and pending together, of every client when client is "",
// ordered by hour, client and reason. Rows older than
// store.HourRetention are gone.
func (l *Ledger) RefusalHours(ctx context.Context, client string, since time.Time) ([]store.RefusalRow, error) {
	r := &read[store.RefusalRow]{kind: refusalRows, client: client, every: client == "", since: store.Hour(since)}
	return r.do(l, func(st store.Backend) ([]store.RefusalRow, error) { return st.RefusalHours(ctx, client, r.since) },
		func(u store.UsageBatch) (p []store.RefusalRow) {
			for k, n := range l.refusals {
				p = r.keep(p, refusalRows.hour(refusalRow(k, n)))
			}
			return r.keepAll(p, u.Refusals)
		})
}

// RefusalSlots returns the refusals by 5-minute slot (Hour holding the
// slot) since the slot of since, stored and pending together, of every
// client when client is "", ordered by slot, client and reason. Rows
// older than store.SlotRetention are gone.
func (l *Ledger) RefusalSlots(ctx context.Context, client string, since time.Time) ([]store.RefusalRow, error) {
	r := &read[store.RefusalRow]{kind: refusalRows, client: client, every: client == "", since: store.Slot(since), slots: true}
	return r.do(l, func(st store.Backend) ([]store.RefusalRow, error) { return st.RefusalSlots(ctx, client, r.since) },
		func(u store.UsageBatch) (p []store.RefusalRow) {
			for k, n := range l.refusals {
				p = r.keep(p, refusalRow(k, n))
			}
			return r.keepAll(p, u.SlotRefusals)
		})
}
