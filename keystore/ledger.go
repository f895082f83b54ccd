package keystore

import (
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"
)

// UsageRow is one client's usage of one model on one UTC day.
type UsageRow struct {
	Client           string
	Day              string // YYYY-MM-DD, UTC
	Model            string
	Requests         int64
	PromptTokens     int64
	CompletionTokens int64
}

// TotalTokens returns prompt plus completion tokens.
func (r UsageRow) TotalTokens() int64 { return r.PromptTokens + r.CompletionTokens }

// UsageBatch is one write of the ledger: its rows, and which write of
// which ledger it is. A write whose answer was lost (a connection that
// broke after the store applied it) is retried as the same batch, and a
// store that can lose answers applies it only once.
type UsageBatch struct {
	Writer string // the ledger's own random ID
	Seq    uint64 // grows with each new batch of the writer
	Rows   []UsageRow
}

// UsageStore is where the ledger's rows live. A Store that can also keep
// usage implements it.
type UsageStore interface {
	// AddUsage adds the batch's rows to the stored ones, in one
	// transaction, once: a batch of the writer's that is not newer than
	// the last applied is ignored.
	AddUsage(ctx context.Context, b UsageBatch) error
	// UsageSince returns the client's rows of day and later.
	UsageSince(ctx context.Context, client, day string) ([]UsageRow, error)
}

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
	mu       sync.Mutex // protects the fields below
	pending  map[ledgerKey]*UsageRow
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
}

func newLedger() *Ledger {
	return &Ledger{pending: make(map[ledgerKey]*UsageRow), writer: rand.Text()}
}

// Day formats t as the ledger's UTC day.
func Day(t time.Time) string { return t.UTC().Format(time.DateOnly) }

// Add counts one request of client for model at t.
func (l *Ledger) Add(client, model string, at time.Time, prompt, completion int64) {
	l.mu.Lock()
	k := ledgerKey{client, l.dayName(at), model}
	row := l.pending[k]
	if row == nil {
		row = &UsageRow{Client: client, Day: k.day, Model: model}
		l.pending[k] = row
	}
	row.Requests++
	row.PromptTokens += prompt
	row.CompletionTokens += completion
	l.mu.Unlock()
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
// rows as a new batch. A failed batch is kept as it is for the next try.
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
		if err := st.AddUsage(ctx, *unsure); err != nil {
			return err
		}
		l.mu.Lock()
		l.unsure = nil
		l.mu.Unlock()
	}

	l.mu.Lock()
	if len(l.pending) == 0 {
		l.mu.Unlock()
		return nil
	}
	l.seq++
	b := UsageBatch{Writer: l.writer, Seq: l.seq, Rows: make([]UsageRow, 0, len(l.pending))}
	for _, row := range l.pending {
		b.Rows = append(b.Rows, *row)
	}
	clear(l.pending)
	l.mu.Unlock()

	err := st.AddUsage(ctx, b)
	if err != nil {
		l.mu.Lock()
		l.unsure = &b
		l.mu.Unlock()
	}
	return err
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
	rows, err := l.UsageSince(ctx, client, since)
	var total int64
	for _, r := range rows {
		total += r.TotalTokens()
	}
	return total, err
}

func merge(rows, pending []UsageRow) []UsageRow {
	for _, p := range pending {
		found := false
		for i := range rows {
			if rows[i].Day == p.Day && rows[i].Model == p.Model {
				rows[i].Requests += p.Requests
				rows[i].PromptTokens += p.PromptTokens
				rows[i].CompletionTokens += p.CompletionTokens
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

// AddUsage implements UsageStore. A transaction that failed was not
// applied, so a batch written again cannot count twice: the writer and
// sequence are not needed here.
func (s *SQLite) AddUsage(ctx context.Context, b UsageBatch) error {
	return s.write(ctx, func(tx *sql.Tx) error {
		stmt, err := tx.PrepareContext(ctx, `INSERT INTO usage (client, day, model, requests, prompt_tokens, completion_tokens)
			VALUES (?, ?, ?, ?, ?, ?)
			ON CONFLICT (client, day, model) DO UPDATE SET
				requests = requests + excluded.requests,
				prompt_tokens = prompt_tokens + excluded.prompt_tokens,
				completion_tokens = completion_tokens + excluded.completion_tokens`)
		if err != nil {
			return err
		}
		defer stmt.Close()
		for _, r := range b.Rows {
			if _, err := stmt.ExecContext(ctx, r.Client, r.Day, r.Model, r.Requests, r.PromptTokens, r.CompletionTokens); err != nil {
				return fmt.Errorf("writing usage: %w", err)
			}
		}
		return nil
	})
}

// UsageSince implements UsageStore.
func (s *SQLite) UsageSince(ctx context.Context, client, day string) ([]UsageRow, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT day, model, requests, prompt_tokens, completion_tokens
		FROM usage WHERE client = ? AND day >= ? ORDER BY day, model`, client, day)
	if err != nil {
		return nil, fmt.Errorf("reading usage: %w", err)
	}
	defer rows.Close()
	var out []UsageRow
	for rows.Next() {
		r := UsageRow{Client: client}
		if err := rows.Scan(&r.Day, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens); err != nil {
			return nil, fmt.Errorf("reading usage: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}
