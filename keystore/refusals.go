package keystore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// RefusalRow is how many requests of one identified client the proxy
// refused for one reason in one UTC hour.
type RefusalRow struct {
	Client string
	Hour   string // YYYY-MM-DDTHH, UTC (see Hour)
	Reason string // the error code of the refusals, such as rate_limit_exceeded
	Count  int64
}

// maxReasonLen bounds a refusal's reason: the proxy's error codes are
// short.
const maxReasonLen = 64

// ValidReason reports whether reason can be a refusal's: 1 to 64 bytes
// of a-z, 0-9 and _, as the proxy's error codes are.
func ValidReason(reason string) bool {
	if reason == "" || len(reason) > maxReasonLen {
		return false
	}
	for i := 0; i < len(reason); i++ {
		if c := reason[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' {
			return false
		}
	}
	return true
}

// refusalKey names a pending refusal row: hour holds its 5-minute slot,
// or its hour once foldSlots folded it.
type refusalKey struct{ client, hour, reason string }

// Refuse counts one request of client that the proxy refused for reason
// at t. The counts are kept by hour (HourRetention) and by 5-minute slot
// (SlotRetention) only, not in the daily rows: quotas and usage answers never see them. A reason that
// ValidReason refuses is not counted, and the error says so.
func (l *Ledger) Refuse(client, reason string, at time.Time) error {
	if !ValidReason(reason) {
		return fmt.Errorf("counting a refusal: %w: reason '%s' is not 1 to %d bytes of a-z, 0-9 and _", ErrInvalid, reason, maxReasonLen)
	}
	l.mu.Lock()
	k := refusalKey{client, l.slotName(at), reason}
	l.refusals[k] = addCount(l.refusals[k], 1)
	l.mu.Unlock()
	return nil
}

// RefusalStore is a UsageStore that also keeps the batches' Refusals.
// Both stores implement it.
type RefusalStore interface {
	// RefusalHours returns the refusal rows of hour and later, of every
	// client when client is "", else of that client.
	RefusalHours(ctx context.Context, client, hour string) ([]RefusalRow, error)
}

// errNoRefusals is the error of RefusalHours on a store that keeps no
// refusals.
var errNoRefusals = errors.New("the key store keeps no refusals")

// RefusalHours returns the refusals by hour since the hour of since,
// stored and pending together, of every client when client is "",
// ordered by hour, client and reason. Rows older than HourRetention are
// gone.
func (l *Ledger) RefusalHours(ctx context.Context, client string, since time.Time) ([]RefusalRow, error) {
	hour := Hour(since)
	keep := func(r RefusalRow) bool { return (client == "" || r.Client == client) && r.Hour >= hour }
	l.mu.Lock()
	st := l.store
	var pending []RefusalRow
	for k, n := range l.refusals {
		if r := (RefusalRow{Client: k.client, Hour: k.hour[:len(hourLayout)], Reason: k.reason, Count: n}); keep(r) {
			pending = append(pending, r)
		}
	}
	// A batch that may have been applied counts until it is known, as
	// in UsageSince.
	if l.unsure != nil {
		for _, r := range l.unsure.Refusals {
			if keep(r) {
				pending = append(pending, r)
			}
		}
	}
	l.mu.Unlock()
	rs, ok := st.(RefusalStore)
	if !ok {
		return nil, errNoRefusals
	}
	rows, err := rs.RefusalHours(ctx, client, hour)
	if err != nil {
		return nil, err
	}
	return mergeRefusalRows(rows, pending), nil
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
func addRefusals(ctx context.Context, tx *sql.Tx, rows []RefusalRow, now time.Time) ([]RefusalRow, error, error) {
	oldest := now.Add(-HourRetention).UTC().Truncate(time.Hour).Unix()
	if _, err := tx.ExecContext(ctx, `DELETE FROM refusals_hours WHERE hour < ?`, oldest); err != nil {
		return nil, nil, fmt.Errorf("dropping old refusals: %w", err)
	}
	if len(rows) == 0 {
		return nil, nil, nil
	}
	stmt, err := tx.PrepareContext(ctx, addRefusalSQL)
	if err != nil {
		return nil, nil, err
	}
	defer stmt.Close()
	var refused []RefusalRow
	var why error
	for _, r := range rows {
		h, err := ParseHour(r.Hour)
		if err != nil {
			refused, why = append(refused, r), err
			continue
		}
		_, err = stmt.ExecContext(ctx, r.Client, h.Unix(), r.Reason, r.Count)
		switch {
		case err == nil:
		case refusesRow(err):
			refused, why = append(refused, r), err
		default:
			return nil, nil, fmt.Errorf("writing refusals: %w", err)
		}
	}
	return refused, why, nil
}

// RefusalHours implements RefusalStore.
func (s *SQLite) RefusalHours(ctx context.Context, client, hour string) ([]RefusalRow, error) {
	from, err := ParseHour(hour)
	if err != nil {
		return nil, fmt.Errorf("reading refusals: %w: hour '%s' is not YYYY-MM-DDTHH", ErrInvalid, hour)
	}
	q := `SELECT client, hour, reason, count FROM refusals_hours WHERE hour >= ?`
	args := []any{from.Unix()}
	if client != "" {
		q += ` AND client = ?`
		args = append(args, client)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("reading refusals: %w", err)
	}
	defer rows.Close()
	var out []RefusalRow
	for rows.Next() {
		var r RefusalRow
		var unix int64
		if err := rows.Scan(&r.Client, &unix, &r.Reason, &r.Count); err != nil {
			return nil, fmt.Errorf("reading refusals: %w", err)
		}
		r.Hour = Hour(time.Unix(unix, 0))
		out = append(out, r)
	}
	return out, rows.Err()
}

// refusalField is the field of a client's refusals for reason in an
// hour's Redis hash. It begins with a letter, where every usage field
// begins with a digit (see hourField), so that neither is read as the
// other; the client's length keeps clients apart.
func refusalField(client, reason string) string {
	return redisRefusedField + hourField(client) + reason
}

// redisRefusedField begins the refusal fields of an hour's hash.
const redisRefusedField = "refused\x00"

// splitRefusalField reads a field that refusalField wrote.
func splitRefusalField(field string) (client, reason string, ok bool) {
	rest, ok := strings.CutPrefix(field, redisRefusedField)
	if !ok {
		return "", "", false
	}
	colon := strings.IndexByte(rest, ':')
	if colon < 0 {
		return "", "", false
	}
	n, err := strconv.Atoi(rest[:colon])
	if err != nil || n < 0 || colon+1+n > len(rest) {
		return "", "", false
	}
	rest = rest[colon+1:]
	return rest[:n], rest[n:], true
}

// RefusalHours implements RefusalStore: the refusal fields of the hours'
// hashes (see UsageHours).
func (s *Redis) RefusalHours(ctx context.Context, client, hour string) ([]RefusalRow, error) {
	hashes, err := s.hourHashes(ctx, hour)
	if err != nil {
		return nil, fmt.Errorf("reading refusals: %w", err)
	}
	return refusalsOfHashes(hashes, client)
}

// refusalsOfHashes reads the refusal rows of client ("" for every
// client) out of hour or slot hashes: each row's Hour is its hash's hour
// or slot.
func refusalsOfHashes(hashes []hourHash, client string) ([]RefusalRow, error) {
	var out []RefusalRow
	for _, h := range hashes {
		for field, v := range h.fields {
			c, reason, ok := splitRefusalField(field)
			if !ok || client != "" && c != client {
				continue
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("reading refusals of %s: %w", h.hour, err)
			}
			out = append(out, RefusalRow{Client: c, Hour: h.hour, Reason: reason, Count: n})
		}
	}
	return out, nil
}
