package policy

import (
	"errors"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/limiter"
)

// Queue is how long requests wait for capacity instead of an instant
// 429: for the caller's own concurrency slot, the upstream_limits and the
// upstream's own word that the key is spent.
type Queue struct {
	// Off turns the queue off (for a tier: whatever the site's default
	// says): a full limit is an instant 429, as without a queue.
	Off bool `json:"off,omitempty"`

	// The longest a request waits for its turn, from 1ms to 10m; a
	// request whose turn cannot come by then is refused at once with
	// 429 queue_timeout. Required unless off.
	MaxWait caddy.Duration `json:"max_wait,omitempty"`

	// The most requests waiting at once on the site; past it, 429
	// queue_full. Only the site's queue sets it. Default: 1000.
	Length int `json:"length,omitempty"`

	// The most places one caller may hold in the queue; past it, 429
	// queue_full. Default: length/16, at least 1: one caller's burst
	// cannot fill the queue, yet sixteen busy callers can.
	PerCaller int `json:"per_caller,omitempty"`
}

// DefaultQueueLength is the default of the site queue's length.
const DefaultQueueLength = 1000

// MaxQueueWait is the longest max_wait a queue may have: a request
// held longer is better refused, and tried again by its client.
const MaxQueueWait = 10 * time.Minute

// SetDefaults gives a site's queue its defaults.
func (q *Queue) SetDefaults() {
	if q.Off {
		return
	}
	if q.Length == 0 {
		q.Length = DefaultQueueLength
	}
	if q.PerCaller == 0 {
		q.PerCaller = max(1, q.Length/16)
	}
}

// Check refuses a queue's impossible values; site tells the site's
// queue from a tier's, which may not set a length.
func (q *Queue) Check(site bool) error {
	if q.Off {
		if q.MaxWait != 0 || q.Length != 0 || q.PerCaller != 0 {
			return errors.New("queue: off takes no max_wait, length or per_caller")
		}
		return nil
	}
	if q.MaxWait <= 0 || time.Duration(q.MaxWait) > MaxQueueWait {
		return fmt.Errorf("queue: max_wait must be above 0 and at most %s, not %s", MaxQueueWait, time.Duration(q.MaxWait))
	}
	if !site && q.Length != 0 {
		return errors.New("queue: a tier's queue takes no length: the site's queue holds every tier's requests")
	}
	if q.Length < 0 || q.PerCaller < 0 {
		return errors.New("queue: length and per_caller must be positive")
	}
	if site && q.PerCaller > q.Length {
		return fmt.Errorf("queue: per_caller (%d) must be at most length (%d)", q.PerCaller, q.Length)
	}
	return nil
}

// MaxWeight is the highest weight of a tier.
const MaxWeight = 1000

// TierWeight is a tier's weight, its default 1 when unset.
func (t *Tier) TierWeight() int { return max(1, t.Weight) }

// UpstreamLimits are what the proxy sends the upstream at most, over
// every caller of the site; with a store redis, over the whole fleet.
type UpstreamLimits struct {
	// Requests per window, as a token bucket, like a tier's requests.
	Requests *TierRate `json:"requests,omitempty"`

	// Prompt and completion tokens per window, as a token bucket: each
	// request reserves its estimate and is charged what it used.
	Tokens *TierRate `json:"tokens,omitempty"`

	// Requests in flight upstream at once, streams included.
	Concurrent int `json:"concurrent,omitempty"`
}

// Limits checks u and returns it as the limiter keeps it.
func (u *UpstreamLimits) Limits() (limiter.Limits, error) {
	var l limiter.Limits
	for _, r := range []*TierRate{u.Requests, u.Tokens} {
		if r != nil && (r.N <= 0 || r.Window <= 0 || r.Burst < 0) {
			return l, errors.New("upstream_limits: a rate needs a positive n and window")
		}
	}
	if u.Concurrent < 0 {
		return l, errors.New("upstream_limits: concurrent must be positive")
	}
	if u.Requests != nil {
		l.Requests = limiter.Rate{N: u.Requests.N, Window: time.Duration(u.Requests.Window), Burst: u.Requests.Burst}
	}
	if u.Tokens != nil {
		l.Tokens = limiter.Rate{N: u.Tokens.N, Window: time.Duration(u.Tokens.Window), Burst: u.Tokens.Burst}
	}
	l.Concurrent = u.Concurrent
	if l.Requests.N == 0 && l.Tokens.N == 0 && l.Concurrent == 0 {
		return l, errors.New("upstream_limits: set at least one of requests, tokens and concurrent")
	}
	return l, nil
}
