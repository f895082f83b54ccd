package keystore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// SlotStep is the length of the ledger's shortest rows: the dashboard's
// last 24 hours are charted by 5 minutes.
const SlotStep = 5 * time.Minute

// SlotRetention is how long the ledger's 5-minute rows (usage and
// refusals) are kept: the dashboard's last 24 hours, with two to spare
// for instances whose clocks differ. The hourly rows are kept
// HourRetention, the daily ones far longer.
const SlotRetention = 26 * time.Hour

// slotLayout is the ledger's UTC 5-minute slot, named by its first
// minute: YYYY-MM-DDTHH:MM. Its first len(hourLayout) bytes are its
// hour.
const slotLayout = "2006-01-02T15:04"

// Slot formats the 5-minute slot of t as the ledger's: YYYY-MM-DDTHH:MM,
// UTC, the minute a multiple of 5.
func Slot(t time.Time) string { return t.UTC().Truncate(SlotStep).Format(slotLayout) }

// isSlot reports whether a pending row's time is a slot, not an hour
// that foldSlots folded it into.
func isSlot(s string) bool { return len(s) == len(slotLayout) }

// ParseSlot reads a slot that Slot wrote.
func ParseSlot(s string) (time.Time, error) {
	t, err := time.Parse(slotLayout, s)
	if err == nil && !t.Truncate(SlotStep).Equal(t) {
		return time.Time{}, fmt.Errorf("%w: slot '%s' does not start on a multiple of 5 minutes", ErrInvalid, s)
	}
	return t, err
}

// SlotStore is a UsageStore that also keeps the batches' Slots and
// SlotRefusals, for the dashboard's last 24 hours. Both stores
// implement it.
type SlotStore interface {
	// UsageSlots returns the 5-minute rows (Day holding the slot) of slot
	// and later, of every client when client is "", else of that client.
	UsageSlots(ctx context.Context, client, slot string) ([]UsageRow, error)
	// RefusalSlots returns the refusal rows by 5-minute slot (Hour
	// holding the slot) of slot and later, of every client when client
	// is "", else of that client.
	RefusalSlots(ctx context.Context, client, slot string) ([]RefusalRow, error)
}

// errNoSlots is the error of Slots and RefusalSlots on a store that
// keeps no 5-minute rows.
var errNoSlots = errors.New("the key store keeps no 5-minute usage")

// Slots returns the 5-minute rows (Day holding the UTC slot) since the
// slot of since, stored and pending together, of every client when
// client is "", ordered by slot, client and model. Rows older than
// SlotRetention are gone.
func (l *Ledger) Slots(ctx context.Context, client string, since time.Time) ([]UsageRow, error) {
	slot := Slot(since)
	keep := func(r UsageRow) bool { return (client == "" || r.Client == client) && isSlot(r.Day) && r.Day >= slot }
	l.mu.Lock()
	st := l.store
	var pending []UsageRow
	for _, row := range l.slots {
		if keep(*row) {
			pending = append(pending, *row)
		}
	}
	// A batch that may have been applied counts until it is known, as
	// in UsageSince.
	if l.unsure != nil {
		for _, row := range l.unsure.Slots {
			if keep(row) {
				pending = append(pending, row)
			}
		}
	}
	l.mu.Unlock()
	ss, ok := st.(SlotStore)
	if !ok {
		return nil, errNoSlots
	}
	rows, err := ss.UsageSlots(ctx, client, slot)
	if err != nil {
		return nil, err
	}
	return mergeUsageRows(rows, pending), nil
}

// RefusalSlots returns the refusals by 5-minute slot (Hour holding the
// slot) since the slot of since, stored and pending together, of every
// client when client is "", ordered by slot, client and reason. Rows
// older than SlotRetention are gone.
func (l *Ledger) RefusalSlots(ctx context.Context, client string, since time.Time) ([]RefusalRow, error) {
	slot := Slot(since)
	keep := func(r RefusalRow) bool {
		return (client == "" || r.Client == client) && isSlot(r.Hour) && r.Hour >= slot
	}
	l.mu.Lock()
	st := l.store
	var pending []RefusalRow
	for k, n := range l.refusals {
		if r := (RefusalRow{Client: k.client, Hour: k.hour, Reason: k.reason, Count: n}); keep(r) {
			pending = append(pending, r)
		}
	}
	if l.unsure != nil {
		for _, r := range l.unsure.SlotRefusals {
			if keep(r) {
				pending = append(pending, r)
			}
		}
	}
	l.mu.Unlock()
	ss, ok := st.(SlotStore)
	if !ok {
		return nil, errNoSlots
	}
	rows, err := ss.RefusalSlots(ctx, client, slot)
	if err != nil {
		return nil, err
	}
	return mergeRefusalRows(rows, pending), nil
}

// hoursOfSlots sums 5-minute rows by hour, for a batch's Hours.
func hoursOfSlots(slots []UsageRow) []UsageRow {
	if len(slots) == 0 {
		return nil
	}
	at := make(map[ledgerKey]int, len(slots))
	out := make([]UsageRow, 0, len(slots))
	for _, r := range slots {
		k := ledgerKey{r.Client, r.Day[:len(hourLayout)], r.Model}
		if i, ok := at[k]; ok {
			out[i].Add(r)
			continue
		}
		at[k] = len(out)
		r.Day = k.day
		out = append(out, r)
	}
	return out
}

// refusalHoursOfSlots sums refusal rows by 5-minute slot by hour, for a
// batch's Refusals.
func refusalHoursOfSlots(slots []RefusalRow) []RefusalRow {
	if len(slots) == 0 {
		return nil
	}
	at := make(map[refusalKey]int, len(slots))
	out := make([]RefusalRow, 0, len(slots))
	for _, r := range slots {
		k := refusalKey{r.Client, r.Hour[:len(hourLayout)], r.Reason}
		if i, ok := at[k]; ok {
			out[i].Count = addCount(out[i].Count, r.Count)
			continue
		}
		at[k] = len(out)
		r.Hour = k.hour
		out = append(out, r)
	}
	return out
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
func addSlots(ctx context.Context, tx *sql.Tx, rows []UsageRow, refusals []RefusalRow, now time.Time) ([]UsageRow, []RefusalRow, error, error) {
	oldest := now.Add(-SlotRetention).UTC().Truncate(SlotStep).Unix()
	if _, err := tx.ExecContext(ctx, `DELETE FROM usage_slots WHERE slot < ?`, oldest); err != nil {
		return nil, nil, nil, fmt.Errorf("dropping old 5-minute usage: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM refusals_slots WHERE slot < ?`, oldest); err != nil {
		return nil, nil, nil, fmt.Errorf("dropping old 5-minute refusals: %w", err)
	}
	var refused []UsageRow
	var refusedRefusals []RefusalRow
	var why error
	if len(rows) > 0 {
		stmt, err := tx.PrepareContext(ctx, addSlotSQL)
		if err != nil {
			return nil, nil, nil, err
		}
		defer stmt.Close()
		for _, r := range rows {
			t, err := ParseSlot(r.Day)
			if err == nil {
				_, err = stmt.ExecContext(ctx, r.Client, t.Unix(), r.Model, r.Requests, r.PromptTokens, r.CompletionTokens, r.CachedTokens, r.ReasoningTokens, r.Cost)
			}
			switch {
			case err == nil:
			case refusesRow(err) || errors.Is(err, ErrInvalid) || isParseError(err):
				refused, why = append(refused, r), err
			default:
				return nil, nil, nil, fmt.Errorf("writing 5-minute usage: %w", err)
			}
		}
	}
	if len(refusals) > 0 {
		stmt, err := tx.PrepareContext(ctx, addSlotRefusalSQL)
		if err != nil {
			return nil, nil, nil, err
		}
		defer stmt.Close()
		for _, r := range refusals {
			t, err := ParseSlot(r.Hour)
			if err == nil {
				_, err = stmt.ExecContext(ctx, t.Unix(), r.Client, r.Reason, r.Count)
			}
			switch {
			case err == nil:
			case refusesRow(err) || errors.Is(err, ErrInvalid) || isParseError(err):
				refusedRefusals, why = append(refusedRefusals, r), err
			default:
				return nil, nil, nil, fmt.Errorf("writing 5-minute refusals: %w", err)
			}
		}
	}
	return refused, refusedRefusals, why, nil
}

// isParseError reports whether err is a time that could not be parsed:
// a row whose slot is not one is refused for good.
func isParseError(err error) bool {
	var pe *time.ParseError
	return errors.As(err, &pe)
}

// UsageSlots implements SlotStore.
func (s *SQLite) UsageSlots(ctx context.Context, client, slot string) ([]UsageRow, error) {
	from, err := ParseSlot(slot)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute usage: %w: slot '%s' is not YYYY-MM-DDTHH:MM", ErrInvalid, slot)
	}
	q := `SELECT client, slot, model, requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost
		FROM usage_slots WHERE slot >= ?`
	args := []any{from.Unix()}
	if client != "" {
		q += ` AND client = ?`
		args = append(args, client)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute usage: %w", err)
	}
	defer rows.Close()
	var out []UsageRow
	for rows.Next() {
		var r UsageRow
		var unix int64
		if err := rows.Scan(&r.Client, &unix, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens, &r.CachedTokens, &r.ReasoningTokens, &r.Cost); err != nil {
			return nil, fmt.Errorf("reading 5-minute usage: %w", err)
		}
		r.Day = Slot(time.Unix(unix, 0))
		out = append(out, r)
	}
	return out, rows.Err()
}

// RefusalSlots implements SlotStore.
func (s *SQLite) RefusalSlots(ctx context.Context, client, slot string) ([]RefusalRow, error) {
	from, err := ParseSlot(slot)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute refusals: %w: slot '%s' is not YYYY-MM-DDTHH:MM", ErrInvalid, slot)
	}
	q := `SELECT client, slot, reason, count FROM refusals_slots WHERE slot >= ?`
	args := []any{from.Unix()}
	if client != "" {
		q += ` AND client = ?`
		args = append(args, client)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute refusals: %w", err)
	}
	defer rows.Close()
	var out []RefusalRow
	for rows.Next() {
		var r RefusalRow
		var unix int64
		if err := rows.Scan(&r.Client, &unix, &r.Reason, &r.Count); err != nil {
			return nil, fmt.Errorf("reading 5-minute refusals: %w", err)
		}
		r.Hour = Slot(time.Unix(unix, 0))
		out = append(out, r)
	}
	return out, rows.Err()
}

// redisSlotPrefix names the hash of every client's usage and refusals
// in a 5-minute slot, laid out as an hour's (see redisHourPrefix); the
// usage script spells it too.
const redisSlotPrefix = "vgt:usage-slot:"

// slotHashes reads each slot's hash from slot to the next, at most
// SlotRetention back, in one round trip.
func (s *Redis) slotHashes(ctx context.Context, slot string) ([]hourHash, error) {
	from, err := ParseSlot(slot)
	if err != nil {
		return nil, fmt.Errorf("%w: slot '%s' is not YYYY-MM-DDTHH:MM", ErrInvalid, slot)
	}
	return s.hashesSince(ctx, redisSlotPrefix, from, SlotStep, SlotRetention, Slot)
}

// UsageSlots implements SlotStore: the usage fields of the slots'
// hashes, read as UsageHours reads the hours'.
func (s *Redis) UsageSlots(ctx context.Context, client, slot string) ([]UsageRow, error) {
	hashes, err := s.slotHashes(ctx, slot)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute usage: %w", err)
	}
	return usageOfHashes(hashes, client)
}

// RefusalSlots implements SlotStore: the refusal fields of the slots'
// hashes.
func (s *Redis) RefusalSlots(ctx context.Context, client, slot string) ([]RefusalRow, error) {
	hashes, err := s.slotHashes(ctx, slot)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute refusals: %w", err)
	}
	return refusalsOfHashes(hashes, client)
}

// Interface guards
var (
	_ SlotStore = (*SQLite)(nil)
	_ SlotStore = (*Redis)(nil)
)
