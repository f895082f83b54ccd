package limiter

import (
	_ "embed"
	"errors"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Slices of large limits. A tier whose buckets and quota are large (a
// burst or a quota of a million or more, or no limit) and that sets no
// concurrency limit needs no exact word from Redis on each request: an
// instance claims a slice of the client's limits, 1% of each burst, and
// tokens of 1% of the quota (the smaller of that and the token bucket's
// slice, as one slice of tokens counts against both), in the Redis
// admission that finds it without one, and admits the client's next
// requests from it, in memory, without a round trip. A budget is a quota
// of money, and is sliced the same way. The slice is taken from the
// buckets and the quota counter in Redis when it is claimed, so that the
// fleet never admits more than the limits: what a slice holds is counted
// as used until it is given back. The instance gives back what it did not
// use sliceTTL after the claim (its next admission then claims again), and
// on Close; a quota's to the counter of the period it was claimed in.
//
// The bound: the fleet admits no more than the limits allow, but may admit
// less, by what the slices hold unused: at most 1.5% of each burst per
// instance and client (a slice, and half of the one before it, as a new one
// is claimed when half of it is left), for at most sliceTTL plus the
// renewal tick. Of a quota, no slice is claimed once less than ten slices
// would be left (10% of it, or less where the token bucket's slice is the
// smaller), nor in the last two seconds of its period: the end
// of a quota is decided exactly, and what other instances' slices still
// hold then is back within sliceTTL. A claim whose answer is lost (a Redis
// that stalled) is never used, and the admission's cancellation gives it
// back. A request that uses more tokens than it reserved from a slice is
// charged to the slice, and what the slice cannot pay is charged to Redis
// in the request's settle, with the refund of what the request reserved
// there: a slice never owes, so the fleet never admits more than the burst
// and the quota, but for what requests use beyond their reservations,
// which Redis' own admissions allow too.
//
// The standing Redis reports counts what slices hold as the client's, not
// as used (redis_lib.lua keeps a counter of it beside each quota counter),
// so that headers, /v1/usage and alerts read what was used.
//
// Requests admitted from a slice hold no lease in Redis: with no
// concurrency limit none is needed, but Redis' State does not count them
// in flight. The standing they are given (the rate-limit headers) is
// Redis' word at the last claim plus what the slice still holds.

// sliceShare is the part of a burst a slice holds: 1%.
const sliceShare = 100

// sliceMinBurst is the smallest burst that is sliced: below it, every
// request is decided by Redis, exactly. Tests lower it.
var sliceMinBurst int64 = 1_000_000

// sliceTTL is how long an instance admits from a slice before it gives it
// back and claims a new one.
const sliceTTL = time.Second

// sliceID is the lease ID of a request admitted from a slice: it names no
// lease in Redis, but is not "", which a Fallback keeps for its local
// limits' leases. Once a call of such a request must go to Redis (a
// reservation its slice cannot hold, a settle its slice cannot take),
// the ID gets a random name after sliceID (named): Redis notes what it
// reserves for the request, and each settle, under it, so that a call
// whose answer was lost is retried, and corrected, without counting
// twice.
const sliceID = "-"

// fromSlice reports whether the lease is of a request admitted from a
// slice.
func (l Lease) fromSlice() bool { return strings.HasPrefix(l.ID, sliceID) }

// named returns a lease from a slice with a name for Redis, as it keeps
// once it has one.
func named(l Lease) Lease {
	if l.ID == sliceID {
		l.ID = sliceID + strconv.FormatUint(rand.Uint64(), 36)
	}
	return l
}

// inRedis returns a lease from a slice as Redis knows it: named, holding
// the part of its reservation that is not its slice's.
func inRedis(l Lease) Lease {
	l = named(l)
	l.Reserved -= l.Local
	l.Local = 0
	return l
}

//go:embed redis_giveback.lua
var luaGiveBack string

var giveBackScript = redis.NewScript(luaLib + luaGiveBack)

// sliceable returns the slices of lim's requests and tokens (0 for no
// limit), and whether lim may be decided from slices at all.
func sliceable(lim *Limits) (requests, tokens int64, ok bool) {
	if lim.NoSlot || lim.Concurrent > 0 {
		return 0, 0, false
	}
	requests, ok = sliceOf(lim.Requests)
	if !ok {
		return 0, 0, false
	}
	if tokens, ok = sliceOf(lim.Tokens); !ok {
		return 0, 0, false
	}
	if q := lim.Quota; !q.Unlimited() {
		if q.N < sliceMinBurst {
			return 0, 0, false
		}
		if tokens == 0 || q.N/sliceShare < tokens {
			tokens = q.N / sliceShare
		}
	}
	return requests, tokens, true
}

// countsTokens reports whether lim counts tokens: in a bucket, a quota
// or both.
func countsTokens(lim *Limits) bool { return !lim.Tokens.Unlimited() || !lim.Quota.Unlimited() }

// samePeriod reports whether two times of admission (unix ms) fall in
// the same period of lim's quota: always, without one.
func samePeriod(lim *Limits, a, b int64) bool {
	if lim.Quota.Unlimited() || a == b {
		return true
	}
	p := lim.Quota.Period
	return p.Start(time.UnixMilli(a)).Equal(p.Start(time.UnixMilli(b)))
}

func sliceOf(r Rate) (int64, bool) {
	if r.Unlimited() {
		return 0, true
	}
	if b := r.Capacity(); b >= sliceMinBurst {
		return b / sliceShare, true
	}
	return 0, false
}

// slice is what an instance holds of one client's limits.
type slice struct {
	lim      Limits    // what it was claimed under
	requests int64     // left to admit
	tokens   int64     // left to reserve; below zero, owed
	got      int64     // tokens claimed
	at       int64     // the time of the claim (Redis' unix ms): its quota period
	id       string    // the lease ID of the admission that claimed it, which names its give-back
	claimed  time.Time // when, by this instance's clock; given back sliceTTL after
	state    State     // Redis' answer to the claim
	claiming bool      // a claim is on its way
}

// standing is the client's standing as the instance sees it: Redis' word
// at the claim, plus what the slice still holds, and the quota used from
// it since.
func (s *slice) standing() State {
	st := s.state
	s.addTo(&st)
	return st
}

// addTo adds the slice to a standing Redis reported, which counts what
// the slice holds as neither left nor used: what it still holds is the
// client's to use, what it gave out since its claim is used.
func (s *slice) addTo(st *State) {
	if !s.lim.Requests.Unlimited() {
		st.RequestsRemaining += s.requests
	}
	if !s.lim.Tokens.Unlimited() {
		st.TokensRemaining += max(s.tokens, 0)
	}
	if !s.lim.Quota.Unlimited() {
		st.QuotaUsed = max(st.QuotaUsed+s.got-s.tokens, 0)
	}
}

// withOwnSlice adds the instance's slice of client's limits to st, Redis'
// answer to State, when it was claimed under lim and, for a quota, in the
// period st is of.
func (r *Redis) withOwnSlice(client string, lim *Limits, st *State) {
	if !r.slicing.Load() {
		return
	}
	b := &r.slices
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.m[client]
	if s == nil || s.claiming || s.lim != *lim ||
		!lim.Quota.Unlimited() && !lim.Quota.Period.End(time.UnixMilli(s.at)).Equal(st.QuotaReset) {
		return
	}
	s.addTo(st)
}

// sliceBook is an instance's slices, by client.
type sliceBook struct {
	mu sync.Mutex // protects m and the slices in it
	m  map[string]*slice
}

// admitFromSlice admits a request from the client's slice, when it holds
// enough; ok is false when Redis must decide.
func (r *Redis) admitFromSlice(client string, lim *Limits, reserve int64, now time.Time) (d Decision, ok bool) {
	rs, ts, ok := sliceable(lim)
	if !ok || tooLarge(lim, 0, reserve) {
		return Decision{}, false
	}
	if rs == 0 && ts == 0 { // nothing limited: nothing to ask Redis
		return Decision{Lease: Lease{Reserved: reserve, ID: sliceID}}, true
	}
	b := &r.slices
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.m[client]
	if s == nil || s.lim != *lim || now.Sub(s.claimed) >= sliceTTL ||
		rs > 0 && s.requests < 1 || ts > 0 && s.tokens < reserve {
		return Decision{}, false
	}
	if rs > 0 {
		s.requests--
	}
	d.Lease = Lease{Reserved: reserve, ID: sliceID, Period: s.at}
	if ts > 0 {
		s.tokens -= reserve
		d.Lease.Local = reserve
	}
	d.State = s.standing()
	return d, true
}

// claimFor returns the slices to claim in an admission of client that
// Redis decides: none when lim is not sliced, a claim is on its way, or
// more than half of the slice is left.
func (r *Redis) claimFor(client string, lim *Limits, now time.Time) (requests, tokens int64) {
	rs, ts, ok := sliceable(lim)
	if !ok || rs == 0 && ts == 0 {
		return 0, 0
	}
	b := &r.slices
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.m[client]
	if s != nil && (s.claiming || s.lim == *lim && now.Sub(s.claimed) < sliceTTL &&
		(rs == 0 || s.requests*2 > rs) && (ts == 0 || s.tokens*2 > ts)) {
		return 0, 0
	}
	if s != nil {
		r.giveBack(client, s) // stale, or of other limits: a new one replaces it
	}
	b.m[client] = &slice{lim: *lim, claiming: true}
	return rs, ts
}

// claimed records the answer to a claim: got requests and tokens at the
// time of admission at (Redis' unix ms) by the admission id, and the
// standing after them (zero when the admission failed).
func (r *Redis) claimed(client string, lim *Limits, requests, tokens, at int64, id string, st State, now time.Time) {
	b := &r.slices
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.m[client]
	if s == nil || !s.claiming {
		// Given back meanwhile (Close): give this back too.
		if requests != 0 || tokens != 0 {
			r.giveBack(client, &slice{lim: *lim, requests: requests, tokens: tokens, got: tokens, at: at, id: id})
		}
		return
	}
	s.claiming = false
	s.requests += requests
	s.tokens += tokens
	s.got, s.at, s.id = tokens, at, id
	s.claimed, s.state = now, st
}

// giveBack queues the give-back of what s holds, and forgets it. The
// caller holds r.slices.mu. A give-back that fails is retried as a
// settle is, while a first attempt that landed is still noted in Redis
// (keepEnded): a repeat changes nothing. One given up leaves the slice's
// tokens and requests counted as used until the buckets refill them, and
// a quota's until its period ends.
func (r *Redis) giveBack(client string, s *slice) {
	delete(r.slices.m, client)
	if s.requests == 0 && s.tokens == 0 && (s.got == 0 || s.lim.Quota.Unlimited()) {
		return
	}
	later := retry{client: client, lim: &s.lim, first: time.Now()}
	if s.id != "" { // a repeat is known by it
		later.giveBack = s
	}
	switch err := r.enqueue(&call{script: giveBackScript, keys: r.keys(client), args: r.giveBackArgs(s), later: later}); {
	case err == nil:
	case errors.Is(err, errQueueFull) && later.giveBack != nil:
		r.retryLater(later)
	default:
		r.logger.Error("giving back a slice of the shared limits failed; it counts as used until the buckets refill, or a quota's until its period ends",
			zap.String("client_id", client), zap.Int64("requests", s.requests), zap.Int64("tokens", s.tokens), zap.Error(err))
	}
}

// giveBackArgs are the give-back script's arguments for s.
func (r *Redis) giveBackArgs(s *slice) []any {
	args := limitArgs(make([]any, 0, 15), &s.lim)
	return append(args, s.requests, s.tokens, s.got, s.at, s.id, r.keepEnded.Milliseconds())
}

// giveBackStale gives back the slices older than sliceTTL, of clients
// that made no request since.
func (r *Redis) giveBackStale(now time.Time) {
	b := &r.slices
	b.mu.Lock()
	defer b.mu.Unlock()
	for client, s := range b.m {
		if !s.claiming && now.Sub(s.claimed) >= sliceTTL {
			r.giveBack(client, s)
		}
	}
}

// giveBackAll gives back every slice, on Close.
func (r *Redis) giveBackAll() {
	b := &r.slices
	b.mu.Lock()
	defer b.mu.Unlock()
	for client, s := range b.m {
		r.giveBack(client, s)
	}
}

// settleSliced settles a request admitted from a slice: the tokens it
// reserved from the slice go back to it, less what it used; what it
// reserved in Redis (its slice was short) is refunded there. Without
// a slice (given back meanwhile), or with one of other limits (the key's
// settings changed) or of another quota period, Redis is charged what it
// used beyond its whole reservation, in its own period. It returns the
// delta for Redis, 0 for none.
func (r *Redis) settleSliced(client string, lim *Limits, lease Lease, used int64) int64 {
	if !countsTokens(lim) {
		return 0
	}
	b := &r.slices
	b.mu.Lock()
	defer b.mu.Unlock()
	if s := b.m[client]; s != nil && s.lim == *lim && (!s.claiming || lim.Quota.Unlimited()) && samePeriod(lim, s.at, lease.Period) {
		s.tokens += lease.Local - used
		delta := -(lease.Reserved - lease.Local)
		if s.tokens < 0 {
			// What the request used beyond the slice goes to Redis in the
			// same settle as the refund, never after it: a refund alone
			// would let the fleet admit the debt again.
			delta -= s.tokens
			s.tokens = 0
		}
		return delta
	}
	return used - lease.Reserved
}

// reserveFromSlice reserves tokens for a request admitted from a slice,
// from the slice when it holds enough; ok is false when Redis must decide.
func (r *Redis) reserveFromSlice(client string, lim *Limits, lease Lease, tokens int64) (d Decision, ok bool) {
	d.Lease = lease
	if !countsTokens(lim) {
		d.Lease.Reserved += tokens
		return d, true
	}
	b := &r.slices
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.m[client]
	if s == nil || s.lim != *lim || s.claiming || s.tokens < tokens || !samePeriod(lim, s.at, lease.Period) {
		return Decision{}, false
	}
	s.tokens -= tokens
	d.Lease.Reserved += tokens
	d.Lease.Local += tokens
	d.State = s.standing()
	return d, true
}
