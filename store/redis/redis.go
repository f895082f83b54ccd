// Package redis is the store backend that several Caddy instances and
// the CLI share: keys, the usage ledger, signing keys and alert claims in
// a Redis server. It owns the whole key layout and its Lua scripts, and
// its one client, which the limiter and the upstream state of the same
// Redis use too (see Store.Client). It registers itself as the "redis"
// kind of store, for redis:// and rediss:// URLs.
//
// It may import store, policy, internal/rediserr and go-redis.
package redis

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/internal/rediserr"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// The Redis layout. Every key of the store starts with "vgt:" (the
// limiter's start with "vgt:lim:"):
//
//	vgt:key:<id>             hash: name, tier, hash (the 32 bytes of the
//	                         SHA-256), created, expires, revoked, last_used
//	                         (unix ms, 0 for none), mint (tiers joined by
//	                         ','; missing in keys of older versions),
//	                         settings (JSON, see Settings; missing or ''
//	                         for none), seq
//	vgt:keys:seq             sorted set: every key ID, scored by its seq
//	vgt:keys:counter         string: the last seq handed out (INCR)
//	vgt:keys:epoch           string: a random number, 1 to 65535, made by
//	                         the first write to an empty store
//	vgt:usage:<client>:<day> hash: "<model>\x00requests", "…\x00prompt",
//	                         "…\x00completion", "…\x00cached",
//	                         "…\x00reasoning", "…\x00cost" (micro-units
//	                         of the currency; missing in rows of older
//	                         versions); expires after usageTTL
//	vgt:usage-hour:<hour>    hash of every client's usage in a UTC hour
//	                         (YYYY-MM-DDTHH): "<len(client)>:<client>
//	                         <model>\x00requests" and the other five as
//	                         above; and the refusals of each client,
//	                         "refused\x00<len(client)>:<client><reason>";
//	                         expires HourRetention after its last write
//	vgt:usage-slot:<slot>    hash of every client's usage and refusals
//	                         in a UTC 5-minute slot (YYYY-MM-DDTHH:MM),
//	                         its fields as an hour's; expires
//	                         SlotRetention after its last write
//	vgt:signing              hash: a field for each signing key, its ID,
//	                         holding 8 bytes of its created time (unix ms,
//	                         big-endian), then its 32-byte Ed25519 seed
//
// Every insert, rotation, revocation and change of settings is one Lua script, which takes
// the next seq and changes the key's hash and its score together, so
// that a reader that has seen seq N has seen every change up to N.
// Last-used times change the hash only: they are not changes.
//
// A Changes cursor is the epoch in its top 16 bits and a seq below. A
// Redis that lost its data (restarted without persistence, flushed,
// restored from an older copy) starts a new epoch or has a counter below
// the cursor; Changes then fails with store.ErrReset rather than
// answering from a history that no longer exists. Redis Cluster is not
// supported: the scripts touch several keys.
const (
	redisKeyPrefix   = "vgt:key:"
	redisSeqKey      = "vgt:keys:seq"
	redisCounterKey  = "vgt:keys:counter"
	redisEpochKey    = "vgt:keys:epoch"
	redisUsagePrefix = "vgt:usage:"
	// redisHourPrefix names the hash of every client's usage in an
	// hour; the script above spells it too.
	redisHourPrefix = "vgt:usage-hour:"
	redisSigningKey = "vgt:signing"
	// redisWriterPrefix names a ledger's last applied batch sequence.
	redisWriterPrefix = "vgt:usage-writer:"

	// redisPage is how many keys one read of Changes, List or a first
	// load asks for at once.
	redisPage = 10_000

	// redisTouchChunk is how many keys one script of TouchLastUsed
	// raises, so that no script holds Redis for long.
	redisTouchChunk = 1000

	// redisTimeout is the default dial, read and write timeout: the
	// Service's operations run in the background of requests, and an
	// unreachable Redis should fail a sync quickly rather than hold it.
	redisTimeout = 2 * time.Second

	// usageTTL is how long a day of the usage ledger is kept after its
	// last write.
	usageTTL = 400 * 24 * time.Hour

	// writerTTL is how long a ledger's last sequence is kept after its
	// last write: a batch retried later than that would count twice.
	// Ledgers retry every second while Redis fails.
	writerTTL = 7 * 24 * time.Hour

	epochShift = 48
	seqMask    = 1<<epochShift - 1
)

// The fields of a key's hash that make its Record, in the order
// parseRecord reads them.
var recordFields = []string{"name", "tier", "hash", "created", "expires", "revoked", "last_used", "mint", "settings"}

var (
	// insertScript adds a key. KEYS: the key's hash, the seq set, the
	// counter, the epoch. ARGV: an epoch for an empty store, the ID,
	// then field and value pairs.
	insertScript = goredis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then
	return redis.error_reply('ERR key ID exists')
end
redis.call('SET', KEYS[4], ARGV[1], 'NX')
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], seq, ARGV[2])
return 'ok'`)

	// setFieldScript sets a field of a live key, such as its hash (a
	// rotation) or its settings. KEYS as insertScript's. ARGV: an epoch,
	// the ID, the field, its new value.
	setFieldScript = goredis.NewScript(`
local revoked = redis.call('HGET', KEYS[1], 'revoked')
if not revoked then
	return 'notfound'
elseif revoked ~= '0' then
	return 'revoked'
end
redis.call('SET', KEYS[4], ARGV[1], 'NX')
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4], 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[2])
return 'ok'`)

	// revokeScript revokes a key once. KEYS as insertScript's. ARGV: an
	// epoch, the ID, the revocation time.
	revokeScript = goredis.NewScript(`
local revoked = redis.call('HGET', KEYS[1], 'revoked')
if not revoked then
	return 'notfound'
elseif revoked ~= '0' then
	return 'ok'
end
redis.call('SET', KEYS[4], ARGV[1], 'NX')
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'revoked', ARGV[3], 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[2])
return 'ok'`)

	// addUsageScript adds a ledger batch once. KEYS: the writer's
	// sequence key, then the days', hours' and slots' usage hashes.
	// ARGV: the batch's sequence, the usage TTL, the writer TTL, the
	// hours' TTL and the slots' TTL in seconds, then for each row the index of its hash in KEYS,
	// the number of its field and increment pairs (six for usage, one
	// for refusals) and the pairs; a zero increment writes nothing. It
	// returns 0 for a batch applied before, else 1 and the numbers (from
	// 0) of the rows it refused: a row whose key is not a hash, or whose fields hold
	// what HINCRBY cannot add to, is checked before anything of it is
	// written, and left out. A sum stops at the largest int64 (rows never
	// hold a negative count), where HINCRBY would fail the script halfway.
	addUsageScript = goredis.NewScript(`
local MAX = '9223372036854775807'
local HOURS = 'vgt:usage-hour:'
local SLOTS = 'vgt:usage-slot:'
local function isInteger(v)
	if not v then
		return true
	end
	local digits = string.match(v, '^%-?([1-9]%d*)$')
	if v == '0' then
		return true
	elseif not digits or #digits > #MAX then
		return false
	end
	return #digits < #MAX or digits <= MAX or v == '-9223372036854775808'
end
local function writable(k, first, last)
	local t = redis.call('TYPE', k).ok
	if t ~= 'hash' and t ~= 'none' then
		return false
	end
	for j = first, last, 2 do
		if not isInteger(redis.call('HGET', k, ARGV[j])) then
			return false
		end
	end
	return true
end

-- A writer's key of another type holds no sequence: SET replaces it.
local last = 0
if redis.call('TYPE', KEYS[1]).ok == 'string' then
	last = tonumber(redis.call('GET', KEYS[1])) or 0
end
if tonumber(ARGV[1]) <= last then
	return {0}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
local result, written = {1}, {}
local i, row = 6, 0
while i <= #ARGV do
	local k = KEYS[tonumber(ARGV[i])]
	local first = i + 2
	local stop = first + 2 * tonumber(ARGV[i+1]) - 2
	if writable(k, first, stop) then
		for j = first, stop, 2 do
			if ARGV[j+1] ~= '0' then
				local sum = redis.pcall('HINCRBY', k, ARGV[j], ARGV[j+1])
				if type(sum) == 'table' and sum.err then -- it would overflow
					redis.call('HSET', k, ARGV[j], MAX)
				end
			end
		end
		written[k] = true
	else
		result[#result+1] = row
	end
	i, row = stop + 2, row + 1
end
for k in pairs(written) do
	if string.sub(k, 1, #HOURS) == HOURS then
		redis.call('EXPIRE', k, ARGV[4])
	elseif string.sub(k, 1, #SLOTS) == SLOTS then
		redis.call('EXPIRE', k, ARGV[5])
	else
		redis.call('EXPIRE', k, ARGV[2])
	end
end
return result`)

	// touchScript raises last-used times, never lowers them, and
	// ignores keys that do not exist. KEYS: keys' hashes. ARGV: a time
	// for each.
	touchScript = goredis.NewScript(`
for i, k in ipairs(KEYS) do
	local cur = redis.call('HGET', k, 'last_used')
	if cur and tonumber(cur) < tonumber(ARGV[i]) then
		redis.call('HSET', k, 'last_used', ARGV[i])
	end
end
return 0`)
)

// Store is a store.Backend in a Redis server, which several Caddy
// instances and the CLI can share. It keeps key hashes, never secrets.
// It is safe for concurrent use. Use Open to make one.
//
// Keys live only in Redis: give it persistence (AOF or RDB) and
// maxmemory-policy noeviction, or a restart or an eviction loses them. A
// Service notices a Redis emptied or restored from an older copy, and
// drops the lost keys from its index; a single evicted key it does not
// notice.
type Store struct {
	client  *goredis.Client
	release func() error // gives client back (see SharedClient)
	page    int          // keys per read: redisPage but in tests
}

// Open connects to the Redis at url ("redis://[:PASSWORD@]HOST:PORT/DB",
// or "rediss://" for TLS) and checks that it answers. Its client is the
// one this process shares for url (see SharedClient): timeouts and the
// pool size may be set in the URL's query (dial_timeout=…, pool_size=…);
// the defaults suit a Service: 2s timeouts, no retries of dials or
// commands (the Service tries again at its next poll).
func Open(rawURL string) (*Store, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		// The error repeats the URL, which may hold a password.
		return nil, errors.New("opening key store: invalid redis URL: use redis://[:PASSWORD@]HOST:PORT/DB")
	}
	name := u.Redacted()
	client, release, err := SharedClient(rawURL, 0)
	if err != nil {
		return nil, fmt.Errorf("opening key store %s: %w", name, err)
	}
	opts := client.Options()
	ctx, cancel := context.WithTimeout(context.Background(), opts.DialTimeout+opts.ReadTimeout)
	defer cancel()
	if err := client.Ping(ctx).Err(); err != nil {
		release()
		return nil, fmt.Errorf("opening key store %s: %w", name, err)
	}
	return &Store{client: client, release: release, page: redisPage}, nil
}

// Client returns the store's Redis client, the one this process shares
// for its URL (see SharedClient). Closing the store gives it back.
func (s *Store) Client() *goredis.Client { return s.client }

// Insert adds a new key.
func (s *Store) Insert(ctx context.Context, r store.Record) error {
	args := []any{newEpoch(), r.ID,
		"name", r.Name, "tier", r.Tier, "hash", r.Hash[:],
		"created", store.Millis(r.Created), "expires", store.Millis(r.Expires),
		"revoked", store.Millis(r.Revoked), "last_used", store.Millis(r.LastUsed),
		"mint", store.JoinMint(r.Mint)}
	settings, err := store.EncodeSettings(r.Settings)
	if err != nil {
		return fmt.Errorf("inserting key %s: %w", r.ID, err)
	}
	if settings != "" {
		args = append(args, "settings", settings)
	}
	if err := insertScript.Run(ctx, s.client, writeKeys(r.ID), args...).Err(); err != nil {
		return fmt.Errorf("inserting key %s: %w", r.ID, err)
	}
	return nil
}

// Get returns the key with the given ID, or ErrNotFound.
func (s *Store) Get(ctx context.Context, id string) (store.Record, error) {
	vals, err := s.client.HMGet(ctx, redisKeyPrefix+id, recordFields...).Result()
	if err != nil {
		return store.Record{}, fmt.Errorf("reading key %s: %w", id, err)
	}
	r, ok, err := parseRecord(id, vals)
	if err != nil {
		return store.Record{}, fmt.Errorf("reading key %s: %w", id, err)
	}
	if !ok {
		return store.Record{}, store.ErrNotFound
	}
	return r, nil
}

// List returns every key, oldest first.
func (s *Store) List(ctx context.Context) ([]store.Record, error) {
	var recs []store.Record
	if _, err := s.read(ctx, 0, s.page, func(page []store.Record) { recs = append(recs, page...) }); err != nil {
		return nil, fmt.Errorf("listing keys: %w", err)
	}
	slices.SortFunc(recs, func(a, b store.Record) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return recs, nil
}

// SetHash replaces the hash of the key id; see Store.
func (s *Store) SetHash(ctx context.Context, id string, h store.Hash) error {
	if err := s.change(ctx, setFieldScript, id, "hash", h[:]); err != nil {
		return fmt.Errorf("setting hash of key %s: %w", id, err)
	}
	return nil
}

// SetSettings replaces the settings of the key id; see Store.
func (s *Store) SetSettings(ctx context.Context, id string, set policy.Settings) error {
	v, err := store.EncodeSettings(set)
	if err == nil {
		err = s.change(ctx, setFieldScript, id, "settings", v)
	}
	if err != nil {
		return fmt.Errorf("setting the settings of key %s: %w", id, err)
	}
	return nil
}

// Revoke revokes the key id at the given time; see Store.
func (s *Store) Revoke(ctx context.Context, id string, at time.Time) error {
	if at.IsZero() {
		return fmt.Errorf("revoking key %s: %w: zero revocation time", id, store.ErrInvalid)
	}
	if err := s.change(ctx, revokeScript, id, store.Millis(at)); err != nil {
		return fmt.Errorf("revoking key %s: %w", id, err)
	}
	return nil
}

// change runs setFieldScript or revokeScript on the key id.
func (s *Store) change(ctx context.Context, script *goredis.Script, id string, args ...any) error {
	res, err := script.Run(ctx, s.client, writeKeys(id), append([]any{newEpoch(), id}, args...)...).Text()
	switch {
	case err != nil:
		return err
	case res == "notfound":
		return store.ErrNotFound
	case res == "revoked":
		return store.ErrRevoked
	}
	return nil
}

// Changes returns the keys changed after cursor; see Store. It fails
// with an error wrapping store.ErrReset when the store lost the history
// that cursor points into.
func (s *Store) Changes(ctx context.Context, cursor uint64) ([]store.Record, uint64, error) {
	var recs []store.Record
	next, err := s.read(ctx, cursor, s.page, func(page []store.Record) { recs = append(recs, page...) })
	if err != nil {
		return nil, cursor, fmt.Errorf("reading key changes: %w", err)
	}
	return recs, next, nil
}

// CountKeys returns the number of keys, revoked ones included.
func (s *Store) CountKeys(ctx context.Context) (int, error) {
	n, err := s.client.ZCard(ctx, redisSeqKey).Result()
	if err != nil {
		return 0, fmt.Errorf("counting keys: %w", err)
	}
	return int(n), nil
}

// LoadAll passes every key to f, batch records at a time, and returns the
// Changes cursor that follows them. A key changed during the load is
// passed again, in its new state.
func (s *Store) LoadAll(ctx context.Context, batch int, f func([]store.Record)) (uint64, error) {
	page := s.page
	if batch > 0 {
		page = min(page, batch)
	}
	cursor, err := s.read(ctx, 0, page, f)
	if err != nil {
		return 0, fmt.Errorf("loading keys: %w", err)
	}
	return cursor, nil
}

// read passes the keys changed after cursor to f, page keys at a time, in
// the order of their changes, and returns the cursor that follows them.
func (s *Store) read(ctx context.Context, cursor uint64, page int, f func([]store.Record)) (uint64, error) {
	// The first page is read with the epoch and the counter, in one
	// transaction, so that a reset store is recognised.
	var epochCmd, counterCmd *goredis.StringCmd
	var rangeCmd *goredis.ZSliceCmd
	seq := cursor & seqMask
	_, err := s.client.TxPipelined(ctx, func(p goredis.Pipeliner) error {
		epochCmd = p.Get(ctx, redisEpochKey)
		counterCmd = p.Get(ctx, redisCounterKey)
		rangeCmd = rangeAfter(ctx, p, seq, page)
		return nil
	})
	if err != nil && !errors.Is(err, goredis.Nil) {
		return cursor, err
	}
	if err := rangeCmd.Err(); err != nil {
		return cursor, err
	}
	epoch, err := storedUint(epochCmd)
	if err != nil {
		return cursor, fmt.Errorf("reading the epoch: %w", err)
	}
	counter, err := storedUint(counterCmd)
	if err != nil {
		return cursor, fmt.Errorf("reading the change counter: %w", err)
	}
	if cursor != 0 && (cursor>>epochShift != epoch || seq > counter) {
		return cursor, store.ErrReset
	}
	ids := rangeCmd.Val()
	for len(ids) > 0 {
		recs, last, err := s.fetch(ctx, ids)
		if err != nil {
			return cursor, err
		}
		f(recs)
		seq = max(seq, last)
		cursor = epoch<<epochShift | seq
		if len(ids) < page {
			break
		}
		if ids, err = rangeAfter(ctx, s.client, seq, page).Result(); err != nil {
			return cursor, err
		}
	}
	return cursor, nil
}

// rangeAfter reads up to page IDs changed after seq, with their seqs.
func rangeAfter(ctx context.Context, c goredis.Cmdable, seq uint64, page int) *goredis.ZSliceCmd {
	return c.ZRangeByScoreWithScores(ctx, redisSeqKey, &goredis.ZRangeBy{
		Min: "(" + strconv.FormatUint(seq, 10), Max: "+inf", Count: int64(page),
	})
}

// fetch reads the records of a page of IDs, in one round trip, and
// returns them with the highest seq of the page. An ID without a record
// (which only a store emptied meanwhile has) is left out.
func (s *Store) fetch(ctx context.Context, ids []goredis.Z) ([]store.Record, uint64, error) {
	cmds := make([]*goredis.SliceCmd, len(ids))
	_, err := s.client.Pipelined(ctx, func(p goredis.Pipeliner) error {
		for i, z := range ids {
			cmds[i] = p.HMGet(ctx, redisKeyPrefix+z.Member.(string), recordFields...)
		}
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	recs := make([]store.Record, 0, len(ids))
	var last uint64
	for i, z := range ids {
		last = max(last, uint64(z.Score))
		r, ok, err := parseRecord(z.Member.(string), cmds[i].Val())
		if err != nil {
			return nil, 0, err
		}
		if ok {
			recs = append(recs, r)
		}
	}
	return recs, last, nil
}

// TouchLastUsed raises last-used times in one pipeline; see Store.
func (s *Store) TouchLastUsed(ctx context.Context, used map[string]time.Time) error {
	if len(used) == 0 {
		return nil
	}
	keys := make([]string, 0, min(len(used), redisTouchChunk))
	args := make([]any, 0, cap(keys))
	_, err := s.client.Pipelined(ctx, func(p goredis.Pipeliner) error {
		for id, at := range used {
			keys = append(keys, redisKeyPrefix+id)
			args = append(args, store.Millis(at))
			if len(keys) == redisTouchChunk {
				// EVAL, not EVALSHA: a pipeline cannot fall back on
				// NOSCRIPT. Redis compiles the script once all the same.
				touchScript.Eval(ctx, p, keys, args...)
				keys, args = make([]string, 0, redisTouchChunk), make([]any, 0, redisTouchChunk)
			}
		}
		if len(keys) > 0 {
			touchScript.Eval(ctx, p, keys, args...)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("recording last use of %d keys: %w", len(used), err)
	}
	return nil
}

// AddUsage implements UsageStore: one script of HINCRBYs, each day's hash
// kept usageTTL after its last write, each hour's (usage and refusals)
// HourRetention, each 5-minute slot's SlotRetention. The script first checks the
// writer's last applied sequence: a batch retried after its answer was
// lost (Redis applied it, then the connection broke) is not counted again.
func (s *Store) AddUsage(ctx context.Context, b store.UsageBatch) error {
	if len(b.Rows) == 0 && len(b.Hours) == 0 && len(b.Refusals) == 0 && len(b.Slots) == 0 && len(b.SlotRefusals) == 0 {
		return nil
	}
	keys := []string{redisWriterPrefix + b.Writer}
	index := make(map[string]int)
	args := []any{b.Seq, int64(usageTTL / time.Second), int64(writerTTL / time.Second), int64(store.HourRetention / time.Second), int64(store.SlotRetention / time.Second)}
	keyIndex := func(k string) int {
		i, ok := index[k]
		if !ok {
			keys = append(keys, k)
			i = len(keys)
			index[k] = i
		}
		return i
	}
	add := func(k, prefix string, r store.UsageRow) {
		i := keyIndex(k)
		prefix += r.Model
		args = append(args, i, 6,
			prefix+"\x00requests", r.Requests,
			prefix+"\x00prompt", r.PromptTokens,
			prefix+"\x00completion", r.CompletionTokens,
			prefix+"\x00cached", r.CachedTokens,
			prefix+"\x00reasoning", r.ReasoningTokens,
			prefix+"\x00cost", r.Cost)
	}
	for _, r := range b.Rows {
		add(usageKey(r.Client, r.Day), "", r)
	}
	for _, r := range b.Hours {
		add(redisHourPrefix+r.Day, hourField(r.Client), r)
	}
	for _, r := range b.Slots {
		add(redisSlotPrefix+r.Day, hourField(r.Client), r)
	}
	for _, r := range b.Refusals {
		args = append(args, keyIndex(redisHourPrefix+r.Hour), 1, refusalField(r.Client, r.Reason), r.Count)
	}
	for _, r := range b.SlotRefusals {
		args = append(args, keyIndex(redisSlotPrefix+r.Hour), 1, refusalField(r.Client, r.Reason), r.Count)
	}
	all := slices.Concat(b.Rows, b.Hours, b.Slots)
	refusals := slices.Concat(b.Refusals, b.SlotRefusals)
	res, err := addUsageScript.Run(ctx, s.client, keys, args...).Int64Slice()
	switch {
	case rediserr.Refused(err):
		return &store.RefusedError{Rows: all, Refusals: refusals, Err: fmt.Errorf("writing usage: %w", err)}
	case err != nil:
		return fmt.Errorf("writing usage: %w", err)
	case len(res) > 1:
		e := &store.RefusedError{Err: errors.New("writing usage: a usage key that is not a hash, or a field that is not an integer")}
		for _, i := range res[1:] {
			if int(i) < len(all) {
				e.Rows = append(e.Rows, all[i])
			} else {
				e.Refusals = append(e.Refusals, refusals[int(i)-len(all)])
			}
		}
		return e
	}
	return nil
}

// UsageSince implements UsageStore. It reads each day from day to
// tomorrow (another instance's clock may be ahead), at most usageTTL
// back, in one round trip.
func (s *Store) UsageSince(ctx context.Context, client, day string) ([]store.UsageRow, error) {
	return s.usageSince(ctx, client, day, time.Now())
}

func (s *Store) usageSince(ctx context.Context, client, day string, now time.Time) ([]store.UsageRow, error) {
	from, err := time.Parse(time.DateOnly, day)
	if err != nil {
		return nil, fmt.Errorf("reading usage: %w: day '%s' is not YYYY-MM-DD", store.ErrInvalid, day)
	}
	today, _ := time.Parse(time.DateOnly, store.Day(now))
	if oldest := today.Add(-usageTTL); from.Before(oldest) {
		from = oldest
	}
	var days []string
	for d := from; !d.After(today.AddDate(0, 0, 1)); d = d.AddDate(0, 0, 1) {
		days = append(days, store.Day(d))
	}
	if len(days) == 0 {
		return nil, nil
	}
	cmds := make([]*goredis.MapStringStringCmd, len(days))
	_, err = s.client.Pipelined(ctx, func(p goredis.Pipeliner) error {
		for i, d := range days {
			cmds[i] = p.HGetAll(ctx, usageKey(client, d))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading usage: %w", err)
	}
	var out []store.UsageRow
	for i, d := range days {
		byModel := make(map[string]*store.UsageRow)
		for field, v := range cmds[i].Val() {
			sep := strings.LastIndexByte(field, 0)
			if sep < 0 {
				continue
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("reading usage of %s on %s: %w", client, d, err)
			}
			model := field[:sep]
			row := byModel[model]
			if row == nil {
				row = &store.UsageRow{Client: client, Day: d, Model: model}
				byModel[model] = row
			}
			setFigure(row, field[sep+1:], n)
		}
		for _, model := range slices.Sorted(maps.Keys(byModel)) {
			out = append(out, *byModel[model])
		}
	}
	return out, nil
}

// SigningKeys returns every signing key, oldest first.
func (s *Store) SigningKeys(ctx context.Context) ([]store.SigningKey, error) {
	stored, err := s.client.HGetAll(ctx, redisSigningKey).Result()
	if err != nil {
		return nil, fmt.Errorf("reading signing keys: %w", err)
	}
	keys := make([]store.SigningKey, 0, len(stored))
	for id, v := range stored {
		if len(v) < 8 {
			return nil, fmt.Errorf("reading signing keys: signing key %s has %d bytes, not 8 of time and a seed", id, len(v))
		}
		k, err := store.SigningKeyFromSeed(id, []byte(v[8:]), int64(binary.BigEndian.Uint64([]byte(v[:8]))))
		if err != nil {
			return nil, fmt.Errorf("reading signing keys: %w", err)
		}
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b store.SigningKey) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return keys, nil
}

// AddSigningKey stores k's created time and seed, with HSETNX: an ID
// already stored is an error.
func (s *Store) AddSigningKey(ctx context.Context, k store.SigningKey) error {
	if err := store.CheckSigningKey(k); err != nil {
		return err
	}
	v := binary.BigEndian.AppendUint64(nil, uint64(store.Millis(k.Created)))
	added, err := s.client.HSetNX(ctx, redisSigningKey, k.ID, append(v, k.Private.Seed()...)).Result()
	if err != nil {
		return fmt.Errorf("adding signing key %s: %w", k.ID, err)
	}
	if !added {
		return fmt.Errorf("adding signing key %s: the ID exists", k.ID)
	}
	return nil
}

// RemoveSigningKey deletes the signing key id; an unknown ID is no error.
func (s *Store) RemoveSigningKey(ctx context.Context, id string) error {
	if err := s.client.HDel(ctx, redisSigningKey, id).Err(); err != nil {
		return fmt.Errorf("removing signing key %s: %w", id, err)
	}
	return nil
}

// Close closes the connections.
func (s *Store) Close() error {
	return s.release()
}

// setFigure sets the figure of row that a usage hash's field names.
func setFigure(row *store.UsageRow, figure string, n int64) {
	switch figure {
	case "requests":
		row.Requests = n
	case "prompt":
		row.PromptTokens = n
	case "completion":
		row.CompletionTokens = n
	case "cached":
		row.CachedTokens = n
	case "reasoning":
		row.ReasoningTokens = n
	case "cost":
		row.Cost = n
	}
}

// usageKey names the hash of a client's usage on a day. The day has a
// fixed length at the end, so that no two clients' keys meet.
func usageKey(client, day string) string {
	return redisUsagePrefix + client + ":" + day
}

// writeKeys are the KEYS of the scripts that change the key id.
func writeKeys(id string) []string {
	return []string{redisKeyPrefix + id, redisSeqKey, redisCounterKey, redisEpochKey}
}

// newEpoch returns an epoch for a store that has none yet: any of 1 to
// 65535, so that a store emptied and written again most likely gets
// another one. Not a secret.
func newEpoch() uint64 {
	return 1 + rand.Uint64N(1<<(64-epochShift)-1)
}

// storedUint reads a counter that may be missing (0).
func storedUint(cmd *goredis.StringCmd) (uint64, error) {
	v, err := cmd.Result()
	if errors.Is(err, goredis.Nil) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(v, 10, 64)
}

// parseRecord reads the HMGET of recordFields for the key id; ok is false
// when the key does not exist.
func parseRecord(id string, vals []any) (r store.Record, ok bool, err error) {
	if len(vals) != len(recordFields) || vals[0] == nil {
		return store.Record{}, false, nil
	}
	str := func(i int) string { s, _ := vals[i].(string); return s }
	var ms [4]int64 // created, expires, revoked, last_used
	for i := range ms {
		if ms[i], err = strconv.ParseInt(str(3+i), 10, 64); err != nil {
			return store.Record{}, false, fmt.Errorf("key %s has a bad %s: %w", id, recordFields[3+i], err)
		}
	}
	hash := str(2)
	if len(hash) != len(r.Hash) {
		return store.Record{}, false, fmt.Errorf("key %s has a hash of %d bytes, not %d", id, len(hash), len(r.Hash))
	}
	// A key of an older version has no mint or settings field: str(7)
	// and str(8) are "".
	r = store.Record{ID: id, Name: str(0), Tier: str(1), Mint: store.SplitMint(str(7))}
	if r.Settings, err = store.DecodeSettings(str(8)); err != nil {
		return store.Record{}, false, fmt.Errorf("key %s: %w", id, err)
	}
	copy(r.Hash[:], hash)
	r.Created, r.Expires, r.Revoked, r.LastUsed = store.FromMillis(ms[0]), store.FromMillis(ms[1]), store.FromMillis(ms[2]), store.FromMillis(ms[3])
	return r, true, nil
}

// Interface guards
var _ store.Backend = (*Store)(nil)

func init() {
	d := &store.Driver{
		Kind:   "redis",
		Target: target,
		Spec:   func(url string) string { return url },
		Open:   func(url string) (store.Backend, error) { return Open(url) },
		Display: func(target string) string {
			if u, err := url.Parse(target); err == nil {
				return u.Redacted()
			}
			return "redis"
		},
	}
	store.Register("redis", d)
	store.Register("rediss", d)
}

// target is the Driver's Target: the URL itself, once it parses.
func target(spec string) (string, error) {
	u, err := url.Parse(spec)
	if err != nil || u.Host == "" || u.Scheme != "redis" && u.Scheme != "rediss" {
		// The URL may hold a password: do not repeat it.
		return "", errors.New("invalid redis store URL: use redis://[:PASSWORD@]HOST:PORT/DB")
	}
	return spec, nil
}
