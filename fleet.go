package vigthoria

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// redisExhaustion shares the upstream's word on one server key's
// exhaustion through Redis. One hash per upstream URL and server key,
// named by their fingerprint (never the key), holds a field per locked
// scope (proxy.KeyScope, or a model's hash): "until noted probe expiry",
// times in unix milliseconds. A field lives until its lockout ends, or,
// when it is to be probed, one lockout bound later; the hash expires
// with its last field, so nothing outlives the bound by more than that,
// a restart of the whole fleet included.
type redisExhaustion struct {
	client  *redis.Client
	key     string // the hash
	probe   string // the prefix of the probe claims' keys
	lockout time.Duration
}

func newRedisExhaustion(client *redis.Client, fingerprint string, lockout time.Duration) *redisExhaustion {
	return &redisExhaustion{
		client:  client,
		key:     "vgt:upstream:lockout:" + fingerprint,
		probe:   "vgt:upstream:probe:" + fingerprint + ":",
		lockout: lockout,
	}
}

// maxSharedScopes bounds the fields of one key's hash: each instance
// keeps at most proxy's own bound of models, and they may differ.
const maxSharedScopes = 1024

// publishScript raises one field to a later until (a probe flag goes
// with the until it came with), drops expired fields, and sets the
// hash's expiry to its last field's. A new field past maxSharedScopes is
// not added.
var publishScript = redis.NewScript(`
local now = tonumber(ARGV[6])
local upto, noted, probe, expiry = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
	local cu, cn, cp, ce = string.match(cur, '^(%d+) (%d+) (%d) (%d+)$')
	cu, cn, ce = tonumber(cu), tonumber(cn), tonumber(ce)
	if cu and ce >= now then
		if cu > upto or (cu == upto and cp == '1') then upto, probe = cu, cp end
		if cn > noted then noted = cn end
		if ce > expiry then expiry = ce end
	end
elseif redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[7]) then
	return 0
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d %d %s %d', upto, noted, probe, expiry))
local last = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
	local e = tonumber(string.match(all[i+1], '(%d+)$') or '0')
	if e < now then
		redis.call('HDEL', KEYS[1], all[i])
	elseif e > last then
		last = e
	end
end
if last > 0 then redis.call('PEXPIREAT', KEYS[1], last) end
return 1`)

// clearScript drops a field noted before ARGV[2], and the claim of its
// probe.
var clearScript = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
	local noted = tonumber(string.match(cur, '^%d+ (%d+)'))
	if noted and noted < tonumber(ARGV[2]) then
		redis.call('HDEL', KEYS[1], ARGV[1])
		redis.call('DEL', KEYS[2])
	end
end
return 0`)

// Publish implements proxy.SharedExhaustion.
func (e *redisExhaustion) Publish(ctx context.Context, w proxy.ScopeWord) error {
	expiry := w.Until
	if w.Probe {
		expiry = expiry.Add(e.lockout)
	}
	probe := "0"
	if w.Probe {
		probe = "1"
	}
	return publishScript.Run(ctx, e.client, []string{e.key}, w.Scope, w.Until.UnixMilli(), w.Noted.UnixMilli(),
		probe, expiry.UnixMilli(), time.Now().UnixMilli(), maxSharedScopes).Err()
}

// Clear implements proxy.SharedExhaustion.
func (e *redisExhaustion) Clear(ctx context.Context, scope string, sent time.Time) error {
	return clearScript.Run(ctx, e.client, []string{e.key, e.probe + scope}, scope, sent.UnixMilli()).Err()
}

// Fetch implements proxy.SharedExhaustion.
func (e *redisExhaustion) Fetch(ctx context.Context) ([]proxy.ScopeWord, error) {
	fields, err := e.client.HGetAll(ctx, e.key).Result()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	var words []proxy.ScopeWord
	for scope, v := range fields {
		var until, noted, expiry int64
		var probe int
		if _, err := fmt.Sscanf(v, "%d %d %d %d", &until, &noted, &probe, &expiry); err != nil || time.UnixMilli(expiry).Before(now) {
			continue
		}
		words = append(words, proxy.ScopeWord{Scope: scope, Until: time.UnixMilli(until), Noted: time.UnixMilli(noted), Probe: probe == 1})
	}
	return words, nil
}

// ClaimProbe implements proxy.SharedExhaustion.
func (e *redisExhaustion) ClaimProbe(ctx context.Context, scope string, every time.Duration) (bool, error) {
	err := e.client.SetArgs(ctx, e.probe+scope, strconv.FormatInt(time.Now().UnixMilli(), 10),
		redis.SetArgs{Mode: "NX", TTL: every}).Err()
	if errors.Is(err, redis.Nil) {
		return false, nil
	}
	return err == nil, err
}

// Interface guards
var _ proxy.SharedExhaustion = (*redisExhaustion)(nil)
