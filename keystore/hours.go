package keystore

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// HourRetention is how long the ledger's hourly rows are kept: the
// dashboard's 30 days, and a whole calendar month (at most 31 days)
// with a day to spare. The daily rows are kept far longer (SQLite:
// forever; Redis: 400 days after their last write).
const HourRetention = 32 * 24 * time.Hour

// hourLayout is the ledger's UTC hour: YYYY-MM-DDTHH.
const hourLayout = "2006-01-02T15"

// Hour formats t as the ledger's UTC hour, YYYY-MM-DDTHH.
func Hour(t time.Time) string { return t.UTC().Format(hourLayout) }

// ParseHour reads an hour that Hour wrote.
func ParseHour(s string) (time.Time, error) { return time.Parse(hourLayout, s) }

// HourStore is a UsageStore that also keeps the batches' Hours, for the
// dashboard's charts. Both stores implement it.
type HourStore interface {
	// UsageHours returns the hourly rows (Day holding the hour) of hour
	// and later, of every client when client is "", else of that client.
	UsageHours(ctx context.Context, client, hour string) ([]UsageRow, error)
}

// errNoHours is the error of Hours on a store that keeps no hourly rows.
var errNoHours = errors.New("the key store keeps no hourly usage")

// Hours returns the hourly rows (Day holding the UTC hour) since the
// hour of since, stored and pending together, of every client when
// client is "", ordered by hour, client and model. Rows older than
// HourRetention are gone.
func (l *Ledger) Hours(ctx context.Context, client string, since time.Time) ([]UsageRow, error) {
	hour := Hour(since)
	keep := func(r UsageRow) bool { return (client == "" || r.Client == client) && r.Day >= hour }
	l.mu.Lock()
	st := l.store
	var pending []UsageRow
	for _, row := range l.slots {
		r := *row
		if r.Day = r.Day[:len(hourLayout)]; keep(r) {
			pending = append(pending, r)
		}
	}
	if l.unsure != nil {
		for _, row := range l.unsure.Hours {
			if keep(row) {
				pending = append(pending, row)
			}
		}
	}
	l.mu.Unlock()
	hs, ok := st.(HourStore)
	if !ok {
		return nil, errNoHours
	}
	rows, err := hs.UsageHours(ctx, client, hour)
	if err != nil {
		return nil, err
	}
	return mergeUsageRows(rows, pending), nil
}

// mergeUsageRows adds pending usage rows to stored ones of a read by
// hour or slot, ordered by time, client and model.
func mergeUsageRows(rows, pending []UsageRow) []UsageRow {
	return mergeHourRows(rows, pending,
		func(r UsageRow) ledgerKey { return ledgerKey{r.Client, r.Day, r.Model} },
		(*UsageRow).Add,
		func(a, b UsageRow) int {
			return cmp.Or(strings.Compare(a.Day, b.Day), strings.Compare(a.Client, b.Client), strings.Compare(a.Model, b.Model))
		})
}

// mergeRefusalRows adds pending refusals to stored ones of a read by hour
// or slot, ordered by time, client and reason.
func mergeRefusalRows(rows, pending []RefusalRow) []RefusalRow {
	return mergeHourRows(rows, pending,
		func(r RefusalRow) refusalKey { return refusalKey{r.Client, r.Hour, r.Reason} },
		func(r *RefusalRow, p RefusalRow) { r.Count = addCount(r.Count, p.Count) },
		func(a, b RefusalRow) int {
			return cmp.Or(strings.Compare(a.Hour, b.Hour), strings.Compare(a.Client, b.Client), strings.Compare(a.Reason, b.Reason))
		})
}

// mergeHourRows adds the pending rows to the stored ones of a read by
// hour (a row of a stored one's key to its sum, the others after them)
// and sorts them by compare.
func mergeHourRows[R any, K comparable](rows, pending []R, key func(R) K, add func(*R, R), compare func(a, b R) int) []R {
	if len(pending) > 0 {
		at := make(map[K]int, len(rows))
		for i, r := range rows {
			at[key(r)] = i
		}
		for _, p := range pending {
			k := key(p)
			if i, ok := at[k]; ok {
				add(&rows[i], p)
				continue
			}
			at[k] = len(rows)
			rows = append(rows, p)
		}
	}
	slices.SortFunc(rows, compare)
	return rows
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
func addHours(ctx context.Context, tx *sql.Tx, rows []UsageRow, now time.Time) ([]UsageRow, error, error) {
	if _, err := tx.ExecContext(ctx, `DELETE FROM usage_hours WHERE hour < ?`, Hour(now.Add(-HourRetention))); err != nil {
		return nil, nil, fmt.Errorf("dropping old hourly usage: %w", err)
	}
	if len(rows) == 0 {
		return nil, nil, nil
	}
	stmt, err := tx.PrepareContext(ctx, addHourSQL)
	if err != nil {
		return nil, nil, err
	}
	defer stmt.Close()
	var refused []UsageRow
	var why error
	for _, r := range rows {
		_, err := stmt.ExecContext(ctx, r.Client, r.Day, r.Model, r.Requests, r.PromptTokens, r.CompletionTokens, r.CachedTokens, r.ReasoningTokens, r.Cost)
		switch {
		case err == nil:
		case refusesRow(err):
			refused, why = append(refused, r), err
		default:
			return nil, nil, fmt.Errorf("writing hourly usage: %w", err)
		}
	}
	return refused, why, nil
}

// UsageHours implements HourStore.
func (s *SQLite) UsageHours(ctx context.Context, client, hour string) ([]UsageRow, error) {
	q := `SELECT client, hour, model, requests, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost
		FROM usage_hours WHERE hour >= ?`
	args := []any{hour}
	if client != "" {
		q += ` AND client = ?`
		args = append(args, client)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("reading hourly usage: %w", err)
	}
	defer rows.Close()
	var out []UsageRow
	for rows.Next() {
		var r UsageRow
		if err := rows.Scan(&r.Client, &r.Day, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens, &r.CachedTokens, &r.ReasoningTokens, &r.Cost); err != nil {
			return nil, fmt.Errorf("reading hourly usage: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// hourField is how a client begins its fields in an hour's Redis hash:
// its length, so that no client and model can be read as another's.
func hourField(client string) string { return strconv.Itoa(len(client)) + ":" + client }

// UsageHours implements HourStore. It reads each hour from hour to the
// next (another instance's clock may be ahead), at most HourRetention
// back, in one round trip; a client's rows are read out of every
// client's.
func (s *Redis) UsageHours(ctx context.Context, client, hour string) ([]UsageRow, error) {
	hashes, err := s.hourHashes(ctx, hour)
	if err != nil {
		return nil, fmt.Errorf("reading hourly usage: %w", err)
	}
	return usageOfHashes(hashes, client)
}

// usageOfHashes reads the usage rows of client ("" for every client)
// out of hour or slot hashes: each row's Day is its hash's hour or slot.
func usageOfHashes(hashes []hourHash, client string) ([]UsageRow, error) {
	var out []UsageRow
	for _, h := range hashes {
		type k struct{ client, model string }
		rows := make(map[k]*UsageRow)
		for field, v := range h.fields {
			c, model, metric, ok := splitHourField(field)
			if !ok || client != "" && c != client {
				continue
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("reading usage of %s: %w", h.hour, err)
			}
			row := rows[k{c, model}]
			if row == nil {
				row = &UsageRow{Client: c, Day: h.hour, Model: model}
				rows[k{c, model}] = row
			}
			setFigure(row, metric, n)
		}
		for _, r := range rows {
			out = append(out, *r)
		}
	}
	return out, nil
}

// hourHash is the Redis hash of one hour's (or one slot's) usage and
// refusals; hour names it.
type hourHash struct {
	hour   string
	fields map[string]string
}

// hourHashes reads each hour's hash from hour to the next (another
// instance's clock may be ahead), at most HourRetention back, in one
// round trip.
func (s *Redis) hourHashes(ctx context.Context, hour string) ([]hourHash, error) {
	from, err := ParseHour(hour)
	if err != nil {
		return nil, fmt.Errorf("%w: hour '%s' is not YYYY-MM-DDTHH", ErrInvalid, hour)
	}
	return s.hashesSince(ctx, redisHourPrefix, from, time.Hour, HourRetention, Hour)
}

// hashesSince reads the hashes of prefix and each period of step (named
// by name) from the one of from to the one after now (another
// instance's clock may be ahead), at most keep back, in one round trip.
func (s *Redis) hashesSince(ctx context.Context, prefix string, from time.Time, step, keep time.Duration, name func(time.Time) string) ([]hourHash, error) {
	now := time.Now().UTC().Truncate(step)
	from = from.UTC().Truncate(step)
	if oldest := now.Add(-keep); from.Before(oldest) {
		from = oldest
	}
	var names []string
	for t := from; !t.After(now.Add(step)); t = t.Add(step) {
		names = append(names, name(t))
	}
	cmds := make([]*redis.MapStringStringCmd, len(names))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, n := range names {
			cmds[i] = p.HGetAll(ctx, prefix+n)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]hourHash, len(names))
	for i, n := range names {
		out[i] = hourHash{hour: n, fields: cmds[i].Val()}
	}
	return out, nil
}

// splitHourField reads a field of an hour's hash: its client, model and
// figure.
func splitHourField(field string) (client, model, metric string, ok bool) {
	colon := strings.IndexByte(field, ':')
	sep := strings.LastIndexByte(field, 0)
	if colon < 0 || sep < 0 {
		return "", "", "", false
	}
	n, err := strconv.Atoi(field[:colon])
	if err != nil || n < 0 || colon+1+n > sep {
		return "", "", "", false
	}
	rest := field[colon+1:]
	return rest[:n], rest[n : sep-colon-1], field[sep+1:], true
}
