package limiter

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// quotaGrace is how long a quota counter outlives its period, for the
// requests that started in it and settle after it (redis_lib.lua says so
// too).
const quotaGrace = 24 * time.Hour

// The scripts are redis_lib.lua (the clock, the limits, the bucket and the
// calendar) followed by the operation's own.
var (
	//go:embed redis_lib.lua
	luaLib string
	//go:embed redis_admit.lua
	luaAdmit string
	//go:embed redis_settle.lua
	luaSettle string
	//go:embed redis_state.lua
	luaState string
	//go:embed redis_reserve.lua
	luaReserve string
	//go:embed redis_cancel.lua
	luaCancel string
	//go:embed redis_renew.lua
	luaRenew string

	admitScript   = redis.NewScript(luaLib + luaAdmit)
	settleScript  = redis.NewScript(luaLib + luaSettle)
	stateScript   = redis.NewScript(luaLib + luaState)
	reserveScript = redis.NewScript(luaLib + luaReserve)
	cancelScript  = redis.NewScript(luaLib + luaCancel)
	renewScript   = redis.NewScript(luaRenew)
)

// requestScripts are the scripts the calls of the request path run, with
// their sources, which are loaded together.
var requestScripts = []struct {
	*redis.Script
	src string
}{
	{admitScript, luaLib + luaAdmit}, {reserveScript, luaLib + luaReserve}, {settleScript, luaLib + luaSettle},
	{stateScript, luaLib + luaState}, {cancelScript, luaLib + luaCancel}, {giveBackScript, luaLib + luaGiveBack},
}

// Redis is the Limiter of a fleet: instances that share one Redis share
// their clients' limits, which then hold across the fleet exactly. Every
// call is one round trip, an atomic Lua script, with the semantics of
// Memory: the same debt-capable buckets (bucket.go), refusal order and
// reasons, RetryAfter and State.
//
// Time is Redis' own (TIME), for the buckets, the leases and the quota's
// calendar period alike, so that instances whose clocks disagree still
// agree; the now parameters of its methods are ignored.
//
// A client's keys, under the prefix, carry its name as the Redis Cluster
// hash tag, so that all the keys of a script share one slot:
//
//	bucket:{client}            both buckets: a hash of the units used (r requests,
//	                           t tokens; above the burst is debt) and their time (ra, ta; µs)
//	lease:{client}             concurrency slots: a sorted set of lease IDs by expiry (unix ms),
//	                           and of leases ended lately by minus their end (redis_lib.lua)
//	held:{client}              the tokens each running lease holds reserved, by lease ID:
//	                           what its Settle or cancellation gives back, whatever the
//	                           instance heard of its calls
//	quota:{client}:2026-03-31  tokens of a UTC day, or quota:{client}:2026-03 of a month
//	quota:{client}:2026-03:sliced  what instances' slices hold of that counter
//
// Each key expires by itself: the buckets when both are full again (a
// missing bucket is full, so nothing is lost), the lease set a minute
// (keepEnded) after its last lease ended or its last slice was given back,
// a quota counter (and what slices hold of it, dropped once all is given
// back) a day after its period ends. A client idle for a minute leaves
// nothing behind but its quota counter.
//
// Every admitted request holds a lease, whatever its tier's concurrency
// limit (but for NoSlot), so that State counts requests in flight as
// Memory does and that Settle can tell a repeat. A lease lives LeaseTTL unless renewed, and the
// instance renews the leases of its running requests (redis_leases.go):
// a request holds its slot however long it runs, and the slots of an
// instance that died are free within LeaseTTL.
//
// A call that fails may still have been applied, when the network failed
// or Redis stalled after the call was sent. The instance repairs what it
// can: a Settle that failed is retried until it lands (a repeat changes
// nothing, see redis_settle.lua), and an Admit that failed is cancelled,
// freeing its slot if it took one. A Reserve that failed but was applied
// leaves its tokens charged on top of what the request used.
//
// Quota use lives in Redis only: unlike Memory, Redis does not read a
// QuotaCounter, so a Redis that loses its data (no persistence) starts the
// period's counters again from zero.
//
// It needs Redis 6.0 or later. Errors are returned wrapped, and the caller
// decides what to do (see Fallback). Use NewRedis, and Close it when done;
// it is safe for concurrent use.
type Redis struct {
	client              redis.UniversalClient
	prefix              string
	logger              *zap.Logger
	timeout             time.Duration // for Redis' answer to a round trip
	health              health
	instances           atomic.Int32 // live instances, as last counted (redis_fleet.go)
	instanceID          string
	joined              int64         // when the heartbeats last added the instance (Redis ms); theirs only
	counted             bool          // every other live instance has beaten since joined; the heartbeats' only
	rejoined            bool          // joined after Redis had forgotten it; the heartbeats' only
	leaseTTL, keepEnded time.Duration // LeaseTTL and keepEnded, but in tests
	running             leaseBook     // leases to renew
	silence             silenceBook   // Redis' last answers, for lease grace (redis_leases.go)
	retries             retryQueue
	batches             [queues]batcher // the calls on their way to Redis (redis_batch.go)
	queueSeed           maphash.Seed
	slicing             atomic.Bool // large buckets are sliced (redis_slices.go)
	slices              sliceBook
	stop, stopped       chan struct{}
	beaten              chan struct{} // the heartbeats ended
	closeOnce           sync.Once
}

// NewRedis returns a Limiter on client; keys are prefixed with prefix (e.g.
// "vgt:lim:"). A round trip to Redis that outlasts timeout, counted from
// when it is sent (a call's wait in its queue behind other calls is not
// Redis' slowness), or fails, starts a probe; a probe that fails makes
// the instance hold Redis for down, and every call then fails at once
// with ErrDown until a probe answers. Meanwhile a call waits for its
// answer up to probeTimeout (or timeout, when longer): a late answer is
// still Redis' decision, exact for the fleet. The client should
// have ContextTimeoutEnabled set: without it, go-redis bounds a call to a
// Redis that hangs by its ReadTimeout, not by the context's deadline. It
// starts the goroutines that send the calls, renew leases, count the live
// instances and retry failed calls, which Close stops.
//
// The buckets and quotas (budgets too) of tiers that set no concurrency
// limit, and whose bursts and quotas are a million or more, are sliced:
// see redis_slices.go for what that costs in exactness.
func NewRedis(client redis.UniversalClient, prefix string, timeout time.Duration, logger *zap.Logger) *Redis {
	r := newRedis(client, prefix, logger, timeout, LeaseTTL, keepEnded)
	r.slicing.Store(true)
	return r
}

// newRedis is NewRedis with the lease TTL and keepEnded given: tests
// shorten them.
func newRedis(client redis.UniversalClient, prefix string, logger *zap.Logger, timeout, leaseTTL, keepEnded time.Duration) *Redis {
	r := &Redis{
		client: client, prefix: prefix, logger: logger, timeout: timeout,
		instanceID: strconv.FormatUint(rand.Uint64(), 36),
		leaseTTL:   leaseTTL, keepEnded: keepEnded,
		stop: make(chan struct{}), stopped: make(chan struct{}), beaten: make(chan struct{}),
	}
	r.health.onChange = r.logCourse
	r.health.probe = r.ping
	r.health.stop = r.stop
	r.running.init()
	r.queueSeed = maphash.MakeSeed()
	for i := range r.batches {
		r.batches[i].init()
	}
	r.slices.m = make(map[string]*slice)
	go r.maintain()
	go r.beat()
	for i := range r.batches {
		go r.flushLoop(&r.batches[i])
	}
	return r
}

// Admit implements Limiter. The lease of an admitted request always has an
// ID, the name of its slot, chosen at random here so that an admission
// whose answer is lost can be cancelled by it.
func (r *Redis) Admit(ctx context.Context, client string, lim *Limits, reserve int64, _ time.Time) (Decision, error) {
	if err := checkReserve(lim, reserve); err != nil {
		return Decision{}, err
	}
	var claimR, claimT int64
	if r.slicing.Load() {
		if d, ok := r.admitFromSlice(client, lim, reserve, time.Now()); ok {
			return d, nil
		}
		claimR, claimT = r.claimFor(client, lim, time.Now())
	}
	claiming := claimR > 0 || claimT > 0
	args := limitArgs(make([]any, 0, 15), lim)
	id := strconv.FormatUint(rand.Uint64(), 36)
	sent := time.Now()
	args = append(args, reserve, r.leaseTTL.Milliseconds(), id, r.leaseGrace(sent).Milliseconds())
	replyLen := 3 + stateReplyLen
	if claiming {
		args = append(args, claimR, claimT)
		replyLen += 2
	}
	vals, err := r.slice(r.run(ctx, admitScript, r.keys(client), args...))
	if err != nil {
		if claiming { // what it may have claimed, its cancellation gives back
			r.claimed(client, lim, 0, 0, 0, "", State{}, time.Now())
		}
		// It may run all the same, in a Redis that stalled, unless it
		// was never sent: even one that failed with ErrDown was.
		if !unsent(err) {
			r.cancelLater(client, lim, id)
		}
		return Decision{}, fmt.Errorf("redis admit: %w", err)
	}
	var d Decision
	var n [3]int64
	var got [2]int64
	ok := len(vals) == replyLen && ints(n[:], vals[:3])
	if ok {
		d.State, ok = parseState(vals[3 : 3+stateReplyLen])
	}
	if ok && claiming {
		ok = ints(got[:], vals[3+stateReplyLen:])
	}
	if !ok || n[0] < 0 || n[0] > int64(TooLarge) {
		if claiming {
			r.claimed(client, lim, 0, 0, 0, "", State{}, time.Now())
		}
		r.cancelLater(client, lim, id)
		return Decision{}, fmt.Errorf("redis admit: unexpected reply %v", vals)
	}
	d.Reason, d.RetryAfter = Reason(n[0]), time.Duration(n[1])
	if d.Reason == Admitted && lim.Concurrent > 0 && r.wokeSince(sent) {
		// Its slot may be a running request's whose lease expired while
		// Redis was silent: undone, as a call whose answer came too late.
		if claiming {
			r.claimed(client, lim, 0, 0, 0, "", State{}, time.Now())
		}
		r.cancelLater(client, lim, id)
		return Decision{}, fmt.Errorf("redis admit: %w", errWoke)
	}
	if claiming {
		r.claimed(client, lim, got[0], got[1], n[2], id, d.State, time.Now())
		// The slices are the client's still: not used, only held here.
		if !lim.Requests.Unlimited() {
			d.RequestsRemaining += got[0]
		}
		if !lim.Tokens.Unlimited() {
			d.TokensRemaining += got[1]
		}
	}
	if d.Reason == Admitted {
		d.Lease = Lease{Reserved: reserve, Period: n[2]}
		if !lim.NoSlot {
			d.Lease.ID = id
			r.running.add(id, client)
		}
	}
	return d, nil
}

// Reserve implements Limiter. The tokens count in the quota period the
// request was admitted in, which its lease ID names, since that is the
// period whose counter Settle corrects. A lease that was settled already
// gets ErrLeaseGone: its Settle would change nothing, so Reserve reserves
// nothing. A lease that expired still reserves, because its Settle still
// charges.
func (r *Redis) Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, _ time.Time) (Decision, error) {
	if err := checkReserve(lim, tokens); err != nil {
		return Decision{Lease: lease}, err
	}
	if lease.fromSlice() {
		if !tooLarge(lim, lease.Reserved, tokens) {
			if d, ok := r.reserveFromSlice(client, lim, lease, tokens); ok {
				return d, nil
			}
		}
		lease = named(lease) // what Redis reserves, its settle finds
	}
	args := limitArgs(make([]any, 0, 14), lim)
	args = append(args, tokens, lease.Reserved, lease.ID, lease.Period, r.leaseTTL.Milliseconds())
	vals, err := r.slice(r.run(ctx, reserveScript, r.keys(client), args...))
	if err != nil {
		return Decision{Lease: lease}, fmt.Errorf("redis reserve: %w", err)
	}
	if len(vals) == 1 && vals[0] == int64(-1) {
		return Decision{Lease: lease}, ErrLeaseGone
	}
	var d Decision
	var n [2]int64
	ok := len(vals) == 2+stateReplyLen && ints(n[:], vals[:2])
	if ok {
		d.State, ok = parseState(vals[2:])
	}
	if !ok || n[0] < 0 || n[0] > int64(TooLarge) {
		return Decision{Lease: lease}, fmt.Errorf("redis reserve: unexpected reply %v", vals)
	}
	d.Reason, d.RetryAfter = Reason(n[0]), time.Duration(n[1])
	if d.Reason == Admitted {
		lease.Reserved += tokens
	}
	d.Lease = lease
	return d, nil
}

// Settle implements Limiter. The tokens used beyond the reservation count
// in the quota period the request was admitted in. A repeat changes
// nothing. A Settle that fails is retried until it lands; the error says
// so.
func (r *Redis) Settle(ctx context.Context, client string, lim *Limits, lease Lease, used int64, _ time.Time) error {
	if lease.holdsNothing(lim, used) {
		return nil
	}
	lease, delta, ok := r.forSettle(client, lim, lease, used)
	if !ok {
		return nil
	}
	_, err := r.run(ctx, settleScript, r.keys(client), r.settleArgs(lim, lease, delta, 0, false)...)
	if err != nil {
		if lease.ID != "" { // without an ID, a repeat would charge again
			r.settleLater(client, lim, lease, delta)
		}
		return fmt.Errorf("redis settle: %w; retried until it lands", err)
	}
	return nil
}

// SettleDeferred implements DeferredSettler: the settle is queued for the
// next pipeline, after every call made before it and before every call
// made after it, and sent within flushEvery. One that fails is retried
// until it lands, as Settle's; Close sends those still queued.
func (r *Redis) SettleDeferred(client string, lim *Limits, lease Lease, used int64, _ time.Time) {
	if lease.holdsNothing(lim, used) {
		return
	}
	lease, delta, ok := r.forSettle(client, lim, lease, used)
	if !ok {
		return
	}
	c := &call{script: settleScript, keys: r.keys(client), args: r.settleArgs(lim, lease, delta, 0, false),
		later: retry{client: client, lim: lim, lease: lease, delta: delta, first: time.Now()}}
	err := r.enqueue(c)
	if errors.Is(err, errClosed) {
		// Nothing sends the queue or the retries any more: one try now.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err = settleScript.Run(ctx, r.client, c.keys, c.args...).Err()
		cancel()
		if err != nil {
			r.logger.Error("settling in the shared limiter after it closed failed; the request's slot frees itself within the lease TTL, its tokens are not corrected",
				zap.String("client_id", client), zap.Int64("tokens", delta), zap.Error(err))
		}
		return
	}
	switch {
	case err == nil:
	case lease.ID != "": // the queue is full: the retries take it
		r.retryLater(c.later)
	default:
		r.logger.Error("settling in the shared limiter failed; the request's tokens are not corrected",
			zap.String("client_id", client), zap.Int64("tokens", delta), zap.Error(err))
	}
}

// slice is the reply of a script run as a slice.
func (r *Redis) slice(cmd *redis.Cmd, err error) ([]any, error) {
	if err != nil {
		return nil, err
	}
	return cmd.Slice()
}

// forSettle returns the lease of a settle as Redis knows it and the
// delta Redis is to be charged, or ok false when Redis has nothing to
// settle: a request from a slice settles there, and only what its slice
// cannot take goes to Redis. A named lease settles in Redis even with
// nothing to correct here: Redis may hold a reservation whose answer was
// lost.
func (r *Redis) forSettle(client string, lim *Limits, lease Lease, used int64) (Lease, int64, bool) {
	if !lease.fromSlice() {
		r.running.remove(lease.ID)
		return lease, used - lease.Reserved, true
	}
	delta := r.settleSliced(client, lim, lease, used)
	if delta == 0 && lease.ID == sliceID {
		return lease, 0, false
	}
	return inRedis(lease), delta, true
}

// settleArgs are the settle script's arguments: delta tokens (used -
// reserved) and requests to charge. unsure says that an earlier attempt
// may have landed longer than keepEnded ago.
func (r *Redis) settleArgs(lim *Limits, lease Lease, delta, requests int64, unsure bool) []any {
	args := limitArgs(make([]any, 0, 16), lim)
	return append(args, delta, lease.ID, lease.Period, r.keepEnded.Milliseconds(), unsure, lease.Reserved, requests)
}

// State implements Limiter. It writes nothing. What this instance's slice
// of the client's limits holds and gave out is added to Redis' word; other
// instances' slices show within about two seconds, when they are given
// back.
func (r *Redis) State(ctx context.Context, client string, lim *Limits, _ time.Time) (State, error) {
	args := limitArgs(make([]any, 0, 9), lim)
	vals, err := r.slice(r.run(ctx, stateScript, r.keys(client), args...))
	if err != nil {
		return State{}, fmt.Errorf("redis state: %w", err)
	}
	s, ok := parseState(vals)
	if !ok {
		return State{}, fmt.Errorf("redis state: unexpected reply %v", vals)
	}
	r.withOwnSlice(client, lim, &s)
	return s, nil
}

// keys returns the client's keys in the order of the scripts' KEYS:
// buckets, leases, the quota counters' name without the period, which
// the scripts append, and the leases' reservations. They share one
// string.
func (r *Redis) keys(client string) []string {
	var b strings.Builder
	b.Grow(4*(len(r.prefix)+len(client)) + len("bucket:{}lease:{}held:{}quota:{}:"))
	var ends [4]int
	for i, kind := range [4]string{"bucket:{", "lease:{", "held:{", "quota:{"} {
		b.WriteString(r.prefix)
		b.WriteString(kind)
		b.WriteString(client)
		b.WriteByte('}')
		ends[i] = b.Len()
	}
	b.WriteByte(':')
	s := b.String()
	return []string{s[:ends[0]], s[ends[0]:ends[1]], s[ends[2]:], s[ends[1]:ends[2]]}
}

// limitArgs appends the tier's limits as the scripts' ARGV 1 to 9 take
// them (redis_lib.lua), zero where there is no limit. They are numbers
// for go-redis to format rather than one string for the script to parse:
// Redis' CPU is shared by the whole fleet, an instance's is not.
func limitArgs(args []any, lim *Limits) []any {
	for _, r := range [2]Rate{lim.Requests, lim.Tokens} {
		if r.Unlimited() {
			args = append(args, 0, 0, 0)
			continue
		}
		burst := r.Burst
		if burst <= 0 {
			burst = r.N
		}
		args = append(args, r.N, int64(r.Window), burst)
	}
	if lim.NoSlot {
		args = append(args, -1) // no lease at all
	} else {
		args = append(args, max(lim.Concurrent, 0))
	}
	if lim.Quota.Unlimited() {
		return append(args, 0, 0)
	}
	return append(args, lim.Quota.N, int(lim.Quota.Period))
}

// stateReplyLen is the length of a State reply, which ends an Admit reply.
const stateReplyLen = 7

// parseState reads the state script's reply (redis_state.lua).
func parseState(vals []any) (State, bool) {
	var n [stateReplyLen]int64
	if len(vals) != stateReplyLen || !ints(n[:], vals) {
		return State{}, false
	}
	s := State{
		RequestsRemaining: n[0],
		RequestsReset:     time.Duration(n[1]),
		TokensRemaining:   n[2],
		TokensReset:       time.Duration(n[3]),
		QuotaUsed:         n[4],
		InFlight:          int(n[6]),
	}
	if n[5] != 0 {
		s.QuotaReset = time.Unix(n[5], 0).UTC()
	}
	return s, true
}

// ints copies integer replies into dst, reporting whether they all are.
func ints(dst []int64, vals []any) bool {
	for i, v := range vals {
		n, ok := v.(int64)
		if !ok {
			return false
		}
		dst[i] = n
	}
	return true
}

// Interface guards
var (
	_ Limiter         = (*Redis)(nil)
	_ DeferredSettler = (*Redis)(nil)
)
