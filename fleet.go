package vigthoria

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// redisExhaustion shares the upstream's word on the server key's
// exhaustion through Redis: one key per upstream holding the latest
// "until" in unix milliseconds, expiring then.
type redisExhaustion struct {
	client *redis.Client
	key    string
}

func newRedisExhaustion(client *redis.Client, upstream string) *redisExhaustion {
	sum := sha256.Sum256([]byte(upstream))
	return &redisExhaustion{client: client, key: "vgt:upstream:exhausted:" + hex.EncodeToString(sum[:8])}
}

// raiseScript sets the key to a later time only, expiring with it.
var raiseScript = redis.NewScript(`
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local v = tonumber(ARGV[1])
if v > cur then
	redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[1])
end
return 0`)

// Publish implements proxy.SharedExhaustion.
func (e *redisExhaustion) Publish(ctx context.Context, until time.Time) error {
	return raiseScript.Run(ctx, e.client, []string{e.key}, until.UnixMilli()).Err()
}

// Fetch implements proxy.SharedExhaustion.
func (e *redisExhaustion) Fetch(ctx context.Context) (time.Time, error) {
	v, err := e.client.Get(ctx, e.key).Result()
	if errors.Is(err, redis.Nil) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, err
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	return time.UnixMilli(ms), err
}

// Interface guards
var _ proxy.SharedExhaustion = (*redisExhaustion)(nil)
