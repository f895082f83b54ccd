package sqlite

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
	msqlite "modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

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
func (s *Store) AddUsage(ctx context.Context, b store.UsageBatch) error {
	var refused []store.UsageRow
	var refusals []store.RefusalRow
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
		return &store.RefusedError{Rows: refused, Refusals: refusals, Err: fmt.Errorf("writing usage: %w", why)}
	}
	return err
}

// refusesRow reports whether err is SQLite refusing the values of a row
// (a constraint, a type, a value too big or out of range), which writing
// it again would not change. A failed statement leaves its transaction
// as it was. A busy, locked, full or failing database is waited out.
func refusesRow(err error) bool {
	var e *msqlite.Error
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
func (s *Store) UsageSince(ctx context.Context, client, day string) ([]store.UsageRow, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT day, model, requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost
		FROM usage WHERE client = ? AND day >= ? ORDER BY day, model`, client, day)
	if err != nil {
		return nil, fmt.Errorf("reading usage: %w", err)
	}
	defer rows.Close()
	var out []store.UsageRow
	for rows.Next() {
		r := store.UsageRow{Client: client}
		if err := rows.Scan(&r.Day, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens, &r.CachedTokens, &r.ReasoningTokens, &r.Cost); err != nil {
			return nil, fmt.Errorf("reading usage: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// ledgerHoursSchema is the SQLite migration that adds the hourly rows
// of the ledger, kept HourRetention.
const ledgerHoursSchema = `CREATE TABLE usage_hours (
		hour              TEXT NOT NULL,
		client            TEXT NOT NULL,
		model             TEXT NOT NULL,
		requests          INTEGER NOT NULL,
		prompt_tokens     INTEGER NOT NULL,
		completion_tokens INTEGER NOT NULL,
		cached_tokens     INTEGER NOT NULL,
		reasoning_tokens  INTEGER NOT NULL,
		cost              INTEGER NOT NULL,
		PRIMARY KEY (hour, client, model)
	) STRICT, WITHOUT ROWID;`

// addHourSQL adds an hourly row, each sum saturating as addUsageSQL's.
var addHourSQL = strings.NewReplacer("INSERT INTO usage (client, day,", "INSERT INTO usage_hours (client, hour,",
	"(client, day, model)", "(hour, client, model)").Replace(addUsageSQL)

// addHours writes the hourly rows in tx and drops those older than
// HourRetention, returning the rows SQLite refused and why.
func addHours(ctx context.Context, tx *sql.Tx, rows []store.UsageRow, now time.Time) ([]store.UsageRow, error, error) {
	if _, err := tx.ExecContext(ctx, `DELETE FROM usage_hours WHERE hour < ?`, store.Hour(now.Add(-store.HourRetention))); err != nil {
		return nil, nil, fmt.Errorf("dropping old hourly usage: %w", err)
	}
	return writeRows(ctx, tx, query{sql: addHourSQL, what: "hourly usage"}, rows, func(r store.UsageRow) ([]any, error) {
		return []any{r.Client, r.Day, r.Model, r.Requests, r.PromptTokens, r.CompletionTokens, r.CachedTokens, r.ReasoningTokens, r.Cost}, nil
	})
}

// UsageHours implements HourStore.
func (s *Store) UsageHours(ctx context.Context, client, hour string) ([]store.UsageRow, error) {
	q := query{what: "hourly usage", sql: `SELECT client, hour, model, requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost
		FROM usage_hours WHERE hour >= ?`}
	return since(ctx, s.db, q, hour, client, func(rows *sql.Rows) (r store.UsageRow, err error) {
		err = rows.Scan(&r.Client, &r.Day, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens, &r.CachedTokens, &r.ReasoningTokens, &r.Cost)
		return r, err
	})
}

// refusalsHoursSchema is the SQLite migration that adds the ledger's
// refusals by hour, kept HourRetention. hour is the unix second the UTC
// hour starts at.
const refusalsHoursSchema = `CREATE TABLE refusals_hours (
		client TEXT NOT NULL,
		hour   INTEGER NOT NULL,
		reason TEXT NOT NULL,
		count  INTEGER NOT NULL,
		PRIMARY KEY (client, hour, reason)
	) STRICT, WITHOUT ROWID;
	CREATE INDEX refusals_hours_hour ON refusals_hours (hour);`

// addRefusalSQL adds a refusal row, its sum saturating as addUsageSQL's.
var addRefusalSQL = `INSERT INTO refusals_hours (client, hour, reason, count) VALUES (?, ?, ?, ?)
	ON CONFLICT (client, hour, reason) DO UPDATE SET ` + saturatingSum("count")

// addRefusals writes the refusal rows in tx and drops those older than
// HourRetention, returning the rows SQLite refused and why.
func addRefusals(ctx context.Context, tx *sql.Tx, rows []store.RefusalRow, now time.Time) ([]store.RefusalRow, error, error) {
	oldest := now.Add(-store.HourRetention).UTC().Truncate(time.Hour).Unix()
	if _, err := tx.ExecContext(ctx, `DELETE FROM refusals_hours WHERE hour < ?`, oldest); err != nil {
		return nil, nil, fmt.Errorf("dropping old refusals: %w", err)
	}
	return writeRows(ctx, tx, query{sql: addRefusalSQL, what: "refusals"}, rows, func(r store.RefusalRow) ([]any, error) {
		h, err := store.ParseHour(r.Hour)
		return []any{r.Client, h.Unix(), r.Reason, r.Count}, err
	})
}

// writeRows runs q for each of rows, with the arguments args makes of it.
// A row whose arguments cannot be made (a malformed hour or slot) or that
// SQLite refuses is returned, with why, and the others are written; any
// other failure ends the write.
func writeRows[R any](ctx context.Context, tx *sql.Tx, q query, rows []R, args func(R) ([]any, error)) (refused []R, why, err error) {
	if len(rows) == 0 {
		return nil, nil, nil
	}
	stmt, err := tx.PrepareContext(ctx, q.sql)
	if err != nil {
		return nil, nil, err
	}
	defer stmt.Close()
	for _, r := range rows {
		a, err := args(r)
		if err == nil {
			_, err = stmt.ExecContext(ctx, a...)
			if err != nil && !refusesRow(err) {
				return nil, nil, fmt.Errorf("writing %s: %w", q.what, err)
			}
		}
		if err != nil {
			refused, why = append(refused, r), err
		}
	}
	return refused, why, nil
}

// RefusalHours implements RefusalStore.
func (s *Store) RefusalHours(ctx context.Context, client, hour string) ([]store.RefusalRow, error) {
	from, err := store.ParseHour(hour)
	if err != nil {
		return nil, fmt.Errorf("reading refusals: %w: hour '%s' is not YYYY-MM-DDTHH", store.ErrInvalid, hour)
	}
	q := query{what: "refusals", sql: `SELECT client, hour, reason, count FROM refusals_hours WHERE hour >= ?`}
	return since(ctx, s.db, q, from.Unix(), client, func(rows *sql.Rows) (r store.RefusalRow, err error) {
		var unix int64
		err = rows.Scan(&r.Client, &unix, &r.Reason, &r.Count)
		r.Hour = store.Hour(time.Unix(unix, 0))
		return r, err
	})
}

// ledgerSlotsSchema is the SQLite migration that adds the ledger's
// 5-minute rows, usage and refusals, kept SlotRetention. slot is the
// unix second the UTC slot starts at.
const ledgerSlotsSchema = `CREATE TABLE usage_slots (
		slot              INTEGER NOT NULL,
		client            TEXT NOT NULL,
		model             TEXT NOT NULL,
		requests          INTEGER NOT NULL,
		prompt_tokens     INTEGER NOT NULL,
		completion_tokens INTEGER NOT NULL,
		cached_tokens     INTEGER NOT NULL,
		reasoning_tokens  INTEGER NOT NULL,
		cost              INTEGER NOT NULL,
		PRIMARY KEY (slot, client, model)
	) STRICT, WITHOUT ROWID;
	CREATE TABLE refusals_slots (
		slot   INTEGER NOT NULL,
		client TEXT NOT NULL,
		reason TEXT NOT NULL,
		count  INTEGER NOT NULL,
		PRIMARY KEY (slot, client, reason)
	) STRICT, WITHOUT ROWID;`

// addSlotSQL adds a 5-minute row, each sum saturating as addUsageSQL's.
var addSlotSQL = strings.NewReplacer("INSERT INTO usage (client, day,", "INSERT INTO usage_slots (client, slot,",
	"(client, day, model)", "(slot, client, model)").Replace(addUsageSQL)

// addSlotRefusalSQL adds a refusal row by 5-minute slot, its sum
// saturating as addUsageSQL's.
var addSlotRefusalSQL = `INSERT INTO refusals_slots (slot, client, reason, count) VALUES (?, ?, ?, ?)
	ON CONFLICT (slot, client, reason) DO UPDATE SET ` + saturatingSum("count")

// addSlots writes the 5-minute rows in tx and drops those older than
// SlotRetention, returning the rows SQLite refused and why.
func addSlots(ctx context.Context, tx *sql.Tx, rows []store.UsageRow, refusals []store.RefusalRow, now time.Time) ([]store.UsageRow, []store.RefusalRow, error, error) {
	oldest := now.Add(-store.SlotRetention).UTC().Truncate(store.SlotStep).Unix()
	if _, err := tx.ExecContext(ctx, `DELETE FROM usage_slots WHERE slot < ?`, oldest); err != nil {
		return nil, nil, nil, fmt.Errorf("dropping old 5-minute usage: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM refusals_slots WHERE slot < ?`, oldest); err != nil {
		return nil, nil, nil, fmt.Errorf("dropping old 5-minute refusals: %w", err)
	}
	refused, why, err := writeRows(ctx, tx, query{sql: addSlotSQL, what: "5-minute usage"}, rows, func(r store.UsageRow) ([]any, error) {
		t, err := store.ParseSlot(r.Day)
		return []any{r.Client, t.Unix(), r.Model, r.Requests, r.PromptTokens, r.CompletionTokens, r.CachedTokens, r.ReasoningTokens, r.Cost}, err
	})
	if err != nil {
		return nil, nil, nil, err
	}
	refusedRefusals, whyRefusals, err := writeRows(ctx, tx, query{sql: addSlotRefusalSQL, what: "5-minute refusals"}, refusals, func(r store.RefusalRow) ([]any, error) {
		t, err := store.ParseSlot(r.Hour)
		return []any{t.Unix(), r.Client, r.Reason, r.Count}, err
	})
	if err != nil {
		return nil, nil, nil, err
	}
	return refused, refusedRefusals, cmp.Or(whyRefusals, why), nil
}

// UsageSlots implements SlotStore.
func (s *Store) UsageSlots(ctx context.Context, client, slot string) ([]store.UsageRow, error) {
	from, err := store.ParseSlot(slot)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute usage: %w: slot '%s' is not YYYY-MM-DDTHH:MM", store.ErrInvalid, slot)
	}
	q := query{what: "5-minute usage", sql: `SELECT client, slot, model, requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost
		FROM usage_slots WHERE slot >= ?`}
	return since(ctx, s.db, q, from.Unix(), client, func(rows *sql.Rows) (r store.UsageRow, err error) {
		var unix int64
		err = rows.Scan(&r.Client, &unix, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens, &r.CachedTokens, &r.ReasoningTokens, &r.Cost)
		r.Day = store.Slot(time.Unix(unix, 0))
		return r, err
	})
}

// RefusalSlots implements SlotStore.
func (s *Store) RefusalSlots(ctx context.Context, client, slot string) ([]store.RefusalRow, error) {
	from, err := store.ParseSlot(slot)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute refusals: %w: slot '%s' is not YYYY-MM-DDTHH:MM", store.ErrInvalid, slot)
	}
	q := query{what: "5-minute refusals", sql: `SELECT client, slot, reason, count FROM refusals_slots WHERE slot >= ?`}
	return since(ctx, s.db, q, from.Unix(), client, func(rows *sql.Rows) (r store.RefusalRow, err error) {
		var unix int64
		err = rows.Scan(&r.Client, &unix, &r.Reason, &r.Count)
		r.Hour = store.Slot(time.Unix(unix, 0))
		return r, err
	})
}

// query is a read of rows since a time: its SQL, whose first parameter
// is where they start, and what it reads, for its errors.
type query struct{ sql, what string }

// since runs q for the rows from from on, of client, or of every client
// when client is "", scanning each with scan.
func since[R any](ctx context.Context, db *sql.DB, q query, from any, client string, scan func(*sql.Rows) (R, error)) ([]R, error) {
	text, args := q.sql, []any{from}
	if client != "" {
		text += ` AND client = ?`
		args = append(args, client)
	}
	rows, err := db.QueryContext(ctx, text, args...)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", q.what, err)
	}
	defer rows.Close()
	var out []R
	for rows.Next() {
		r, err := scan(rows)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", q.what, err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}
