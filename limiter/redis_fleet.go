package limiter

import (
	"context"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// What an instance of a fleet knows of the others, and what it owes them:
// how many instances share the Redis (so that a Fallback shares the
// limits among them while Redis fails), and the Charge of what it
// admitted without Redis, once Redis answers again.

// instancesKey is the sorted set of the live instances, by the time of
// their last heartbeat (Redis' clock, unix ms); under the limiter's
// prefix.
const instancesKey = "instances"

// heartbeatScript notes the calling instance ARGV[1] as live now,
// forgets the instances whose last heartbeat is ARGV[2] ms old, and
// returns how many are live, now, whether the caller was added (it had
// not beaten, or was forgotten), and the oldest live instance's last
// heartbeat.
var heartbeatScript = redis.NewScript(`
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - live)
local added = redis.call('ZADD', KEYS[1], ms, ARGV[1])
redis.call('PEXPIRE', KEYS[1], live)
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {redis.call('ZCARD', KEYS[1]), ms, added, tonumber(oldest[2])}`)

// heartbeatEvery is how often an instance notes itself as live and counts
// the others; each note lasts heartbeatLive, so that a missed beat or two
// never counts a live instance out (which would make the others' shares
// larger), while a dead one is counted a few seconds longer (smaller).
const (
	heartbeatEvery = 250 * time.Millisecond
	heartbeatLive  = 3 * time.Second
)

// beat runs the heartbeats until Close.
func (r *Redis) beat() {
	defer close(r.beaten)
	r.loadScripts()
	tick := time.NewTicker(heartbeatEvery)
	defer tick.Stop()
	for {
		r.heartbeat(heartbeatLive)
		select {
		case <-r.stop:
			return
		case <-tick.C:
		}
	}
}

// heartbeat notes the instance as live for live, and counts the live
// instances. The count is the instance's to share by (Instances) only
// once every other live instance has beaten since it joined, and so
// counts it too: until then an instance that has not heard of it yet may
// take a larger share than it leaves. Until then Instances is 0 as the
// instance first joins, and the count it had when it joins again.
func (r *Redis) heartbeat(live time.Duration) {
	if r.client == nil { // tests of the slices alone
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), max(r.timeout, time.Second))
	defer cancel()
	vals, err := heartbeatScript.Run(ctx, r.client, []string{r.prefix + instancesKey}, r.instanceID, live.Milliseconds()).Int64Slice()
	if err != nil || len(vals) != 4 {
		return // the request path's round trips tell the outage
	}
	r.noteAnswer(time.Now())
	n, now, added, oldest := vals[0], vals[1], vals[2], vals[3]
	if added == 1 { // joined, or forgotten and back: nobody counts it yet
		r.rejoined = r.joined != 0
		r.joined, r.counted = now, false
	}
	// Alone as it first joins, it counts itself at once. Forgotten and
	// back (Redis was away longer than heartbeatLive, and forgot every
	// instance), it is alone only until the others beat again: it waits
	// for them, keeping the count it had, or a Redis that fails again
	// meanwhile would leave it the whole limits as its share.
	if !r.counted && (oldest > r.joined || n == 1 && !r.rejoined) {
		r.counted = true
	}
	switch {
	case r.counted:
		r.instances.Store(int32(n))
	case !r.rejoined:
		r.instances.Store(0)
	}
}

// loadScripts loads the request path's scripts, off it, as the instance
// starts: its first calls need not load them.
func (r *Redis) loadScripts() {
	if r.client == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), max(r.timeout, time.Second))
	defer cancel()
	pipe := r.client.Pipeline()
	for _, s := range requestScripts {
		pipe.ScriptLoad(ctx, s.src)
	}
	pipe.Exec(ctx) // a failure leaves them to the first calls
}

// ping is the health probe: whether Redis answers a PING within
// probeTimeout, or the timeout if longer.
func (r *Redis) ping() error {
	if r.client == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), max(r.timeout, probeTimeout))
	defer cancel()
	err := r.client.Ping(ctx).Err()
	if err == nil {
		r.noteAnswer(time.Now())
	}
	return err
}

// leave forgets the instance in the live set, on Close.
func (r *Redis) leave() {
	if r.client == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	r.client.ZRem(ctx, r.prefix+instancesKey, r.instanceID)
}

// Instances implements Shared: the live instances of the fleet as last
// counted, this one included; 0 until every other live instance has
// counted this one (see heartbeat).
func (r *Redis) Instances() int { return int(r.instances.Load()) }

// Charge implements Shared: requests and tokens admitted without Redis
// are added to the client's buckets (into debt if need be) and the tokens
// to its quota of the period at now. It is queued as a deferred settle
// is, under an ID of its own so that a repeat changes nothing, and
// retried until it lands.
func (r *Redis) Charge(client string, lim *Limits, requests, tokens int64) {
	if requests <= 0 && tokens <= 0 {
		return
	}
	lease := Lease{ID: "charge-" + strconv.FormatUint(rand.Uint64(), 36)}
	c := &call{script: settleScript, keys: r.keys(client), args: r.settleArgs(lim, lease, tokens, requests, false),
		later: retry{client: client, lim: lim, lease: lease, delta: tokens, requests: requests, first: time.Now()}}
	if err := r.enqueue(c); err != nil {
		r.retryLater(c.later)
	}
}

// Answers implements Shared: calls go to Redis unless it is held for
// down.
func (r *Redis) Answers() bool { return r.health.pass() }

// logCourse logs a change of the instance's view of Redis.
func (r *Redis) logCourse(down bool, err error) {
	if down {
		r.logger.Error("a round trip to the shared limiter failed or was late, and a probe failed too; it is held for down until it answers one",
			zap.Duration("probe_every", probeEvery), zap.Error(err))
		return
	}
	r.logger.Info("the shared limiter answers again")
}
