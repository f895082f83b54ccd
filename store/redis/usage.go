package redis

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// hourField is how a client begins its fields in an hour's Redis hash:
// its length, so that no client and model can be read as another's.
func hourField(client string) string { return strconv.Itoa(len(client)) + ":" + client }

// UsageHours implements HourStore. It reads each hour from hour to the
// next (another instance's clock may be ahead), at most HourRetention
// back, in one round trip; a client's rows are read out of every
// client's.
func (s *Store) UsageHours(ctx context.Context, client, hour string) ([]store.UsageRow, error) {
	hashes, err := s.hourHashes(ctx, hour)
	if err != nil {
		return nil, fmt.Errorf("reading hourly usage: %w", err)
	}
	return usageOfHashes(hashes, client)
}

// usageOfHashes reads the usage rows of client ("" for every client)
// out of hour or slot hashes: each row's Day is its hash's hour or slot.
func usageOfHashes(hashes []hourHash, client string) ([]store.UsageRow, error) {
	var out []store.UsageRow
	for _, h := range hashes {
		type k struct{ client, model string }
		rows := make(map[k]*store.UsageRow)
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
				row = &store.UsageRow{Client: c, Day: h.hour, Model: model}
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
func (s *Store) hourHashes(ctx context.Context, hour string) ([]hourHash, error) {
	from, err := store.ParseHour(hour)
	if err != nil {
		return nil, fmt.Errorf("%w: hour '%s' is not YYYY-MM-DDTHH", store.ErrInvalid, hour)
	}
	return s.hashesSince(ctx, redisHourPrefix, from, time.Hour, store.HourRetention, store.Hour)
}

// hashesSince reads the hashes of prefix and each period of step (named
// by name) from the one of from to the one after now (another
// instance's clock may be ahead), at most keep back, in one round trip.
func (s *Store) hashesSince(ctx context.Context, prefix string, from time.Time, step, keep time.Duration, name func(time.Time) string) ([]hourHash, error) {
	now := time.Now().UTC().Truncate(step)
	from = from.UTC().Truncate(step)
	if oldest := now.Add(-keep); from.Before(oldest) {
		from = oldest
	}
	var names []string
	for t := from; !t.After(now.Add(step)); t = t.Add(step) {
		names = append(names, name(t))
	}
	cmds := make([]*goredis.MapStringStringCmd, len(names))
	_, err := s.client.Pipelined(ctx, func(p goredis.Pipeliner) error {
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
func (s *Store) RefusalHours(ctx context.Context, client, hour string) ([]store.RefusalRow, error) {
	hashes, err := s.hourHashes(ctx, hour)
	if err != nil {
		return nil, fmt.Errorf("reading refusals: %w", err)
	}
	return refusalsOfHashes(hashes, client)
}

// refusalsOfHashes reads the refusal rows of client ("" for every
// client) out of hour or slot hashes: each row's Hour is its hash's hour
// or slot.
func refusalsOfHashes(hashes []hourHash, client string) ([]store.RefusalRow, error) {
	var out []store.RefusalRow
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
			out = append(out, store.RefusalRow{Client: c, Hour: h.hour, Reason: reason, Count: n})
		}
	}
	return out, nil
}

// redisSlotPrefix names the hash of every client's usage and refusals
// in a 5-minute slot, laid out as an hour's (see redisHourPrefix); the
// usage script spells it too.
const redisSlotPrefix = "vgt:usage-slot:"

// slotHashes reads each slot's hash from slot to the next, at most
// SlotRetention back, in one round trip.
func (s *Store) slotHashes(ctx context.Context, slot string) ([]hourHash, error) {
	from, err := store.ParseSlot(slot)
	if err != nil {
		return nil, fmt.Errorf("%w: slot '%s' is not YYYY-MM-DDTHH:MM", store.ErrInvalid, slot)
	}
	return s.hashesSince(ctx, redisSlotPrefix, from, store.SlotStep, store.SlotRetention, store.Slot)
}

// UsageSlots implements SlotStore: the usage fields of the slots'
// hashes, read as UsageHours reads the hours'.
func (s *Store) UsageSlots(ctx context.Context, client, slot string) ([]store.UsageRow, error) {
	hashes, err := s.slotHashes(ctx, slot)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute usage: %w", err)
	}
	return usageOfHashes(hashes, client)
}

// RefusalSlots implements SlotStore: the refusal fields of the slots'
// hashes.
func (s *Store) RefusalSlots(ctx context.Context, client, slot string) ([]store.RefusalRow, error) {
	hashes, err := s.slotHashes(ctx, slot)
	if err != nil {
		return nil, fmt.Errorf("reading 5-minute refusals: %w", err)
	}
	return refusalsOfHashes(hashes, client)
}
