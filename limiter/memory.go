package limiter

import (
	"context"
	"hash/maphash"
	"sync"
	"time"
)

const (
	memShards = 256
	// sweepEvery admissions of a shard, a few of its clients are checked
	// and forgotten when idle: no goroutine, and the work is spread thin.
	sweepEvery = 16
	sweepBatch = 32
)

// Memory is the in-memory Limiter of a single instance. Clients are
// spread over shards, each with its own lock. A client whose buckets are
// full again, with nothing in flight, is forgotten, which loses nothing: a
// new client starts with full buckets, and its quota use is read back from
// the QuotaCounter. MaxClients bounds memory beyond that.
//
// Use NewMemory; it is safe for concurrent use.
type Memory struct {
	quota    QuotaCounter
	perShard int
	seed     maphash.Seed
	shards   [memShards]memShard
}

type memShard struct {
	mu  sync.Mutex // protects the fields below
	m   map[string]*clientState
	ops uint32
}

// clientState is one client's standing: 72 bytes.
type clientState struct {
	requests    bucket
	tokens      bucket
	lim         *Limits // of the client's last request, to judge it idle
	quotaUsed   int64
	quotaPeriod int64 // unix nanoseconds of the period quotaUsed counts; 0: not loaded
	inFlight    int32
}

// NewMemory returns a Memory limiter that keeps at most maxClients clients
// and reads quota use from quota (nil: quotas start at zero).
func NewMemory(quota QuotaCounter, maxClients int) *Memory {
	m := &Memory{quota: quota, perShard: max(maxClients/memShards, 1), seed: maphash.MakeSeed()}
	for i := range m.shards {
		m.shards[i].m = make(map[string]*clientState)
	}
	return m
}

// Admit implements Limiter.
func (m *Memory) Admit(ctx context.Context, client string, lim *Limits, reserve int64, now time.Time) (Decision, error) {
	s, st, _, err := m.lockedState(ctx, client, lim, now)
	if err != nil {
		return Decision{}, err
	}
	defer s.mu.Unlock()
	n := now.UnixNano()
	d := st.admit(lim, reserve, n, now)
	if s.ops++; s.ops%sweepEvery == 0 {
		s.sweep(n)
	}
	return d, nil
}

// Reserve implements Limiter. The tokens count in the quota of the period
// at now, which the lease then names for its Settle.
func (m *Memory) Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, now time.Time) (Decision, error) {
	if tokens < 0 {
		return Decision{Lease: lease}, errNegativeReserve
	}
	s, st, period, err := m.lockedState(ctx, client, lim, now)
	if err != nil {
		return Decision{Lease: lease}, err
	}
	defer s.mu.Unlock()
	d := st.reserve(lim, lease.Reserved, tokens, now.UnixNano(), now)
	if d.Reason == Admitted {
		lease.Reserved += tokens
		if period != 0 {
			// Admission reserved nothing, or a moment ago: the lease's
			// reservation counts in this period.
			lease.Period = period
		}
	}
	d.Lease = lease
	return d, nil
}

// lockedState returns client's state for a decision at now, with its
// quota use known for the period at now (whose start it also returns, 0
// without a quota), and its shard locked: the caller unlocks it.
func (m *Memory) lockedState(ctx context.Context, client string, lim *Limits, now time.Time) (*memShard, *clientState, int64, error) {
	s := m.shard(client)
	period, err := m.loadQuota(ctx, s, client, lim, now)
	if err != nil {
		return nil, nil, 0, err
	}
	s.mu.Lock()
	st := s.get(client, m.perShard, now.UnixNano(), lim)
	if period != 0 && st.quotaPeriod != period {
		// Forgotten or rolled over since loadQuota: count from what it read.
		st.quotaPeriod = period
	}
	return s, st, period, nil
}

// Settle implements Limiter.
func (m *Memory) Settle(_ context.Context, client string, lim *Limits, lease Lease, used int64, now time.Time) error {
	s := m.shard(client)
	n := now.UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.get(client, m.perShard, n, lim)
	if st.inFlight > 0 {
		st.inFlight--
	}
	delta := used - lease.Reserved
	if !lim.Tokens.Unlimited() {
		st.tokens.charge(lim.Tokens, float64(delta), n)
	}
	// The quota is corrected in the period the reservation counts in, as
	// Redis does: once that period is over, the new one owes nothing of
	// it, and its refund must not be spent again there.
	if !lim.Quota.Unlimited() && (lease.Period == 0 || lease.Period == st.quotaPeriod) {
		st.quotaUsed = max(st.quotaUsed+delta, 0)
	}
	return nil
}

// State implements Limiter.
func (m *Memory) State(ctx context.Context, client string, lim *Limits, now time.Time) (State, error) {
	s := m.shard(client)
	if _, err := m.loadQuota(ctx, s, client, lim, now); err != nil {
		return State{}, err
	}
	n := now.UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.m[client]
	if !ok {
		st = new(clientState)
	}
	return st.state(lim, n, now), nil
}

// Clients returns how many clients are remembered.
func (m *Memory) Clients() int {
	n := 0
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}

// loadQuota makes sure the client's quota use for the period at now is
// known, reading it from the QuotaCounter (I/O, so outside the lock) the
// first time a client is seen in a period. It returns the period's start.
func (m *Memory) loadQuota(ctx context.Context, s *memShard, client string, lim *Limits, now time.Time) (int64, error) {
	if lim.Quota.Unlimited() {
		return 0, nil
	}
	start := lim.Quota.Period.Start(now)
	period := start.UnixNano()
	s.mu.Lock()
	st, ok := s.m[client]
	known := ok && st.quotaPeriod == period
	s.mu.Unlock()
	if known {
		return period, nil
	}
	var used int64
	if m.quota != nil {
		var err error
		if used, err = m.quota.QuotaUsed(ctx, client, start); err != nil {
			return 0, err
		}
	}
	s.mu.Lock()
	st = s.get(client, m.perShard, now.UnixNano(), lim)
	if st.quotaPeriod != period {
		st.quotaPeriod, st.quotaUsed = period, used
	}
	s.mu.Unlock()
	return period, nil
}

func (m *Memory) shard(client string) *memShard {
	return &m.shards[maphash.String(m.seed, client)%memShards]
}

// get returns the client's state, creating it. When the shard is full it
// first forgets idle clients, and if none is idle, one arbitrary client:
// that client gets a fresh start, the price of bounded memory.
func (s *memShard) get(client string, limit int, now int64, lim *Limits) *clientState {
	if st, ok := s.m[client]; ok {
		st.lim = lim
		return st
	}
	if len(s.m) >= limit {
		s.sweep(now)
		if len(s.m) >= limit {
			for c, st := range s.m {
				if st.inFlight == 0 {
					delete(s.m, c)
					break
				}
			}
		}
	}
	st := &clientState{lim: lim}
	s.m[client] = st
	return st
}

// sweep forgets a few clients that are idle: nothing in flight and both
// buckets full again.
func (s *memShard) sweep(now int64) {
	checked := 0
	for c, st := range s.m {
		if checked++; checked > sweepBatch {
			return
		}
		if st.idle(now) {
			delete(s.m, c)
		}
	}
}

func (st *clientState) idle(now int64) bool {
	lim := st.lim
	if st.inFlight > 0 {
		return false
	}
	if !lim.Requests.Unlimited() && !st.requests.full(lim.Requests, now) {
		return false
	}
	return lim.Tokens.Unlimited() || st.tokens.full(lim.Tokens, now)
}

func (st *clientState) admit(lim *Limits, reserve int64, n int64, now time.Time) Decision {
	d := Decision{}
	switch {
	case tooLarge(lim, 0, reserve):
		d.Reason, d.RetryAfter = TooLarge, -1
	case lim.Concurrent > 0 && int(st.inFlight) >= lim.Concurrent:
		d.Reason, d.RetryAfter = ConcurrencyLimit, time.Second
	case !lim.Quota.Unlimited() && st.quotaUsed+reserve > lim.Quota.N:
		d.Reason, d.RetryAfter = QuotaLimit, lim.Quota.Period.End(now).Sub(now)
	}
	if d.Reason == Admitted && !lim.Requests.Unlimited() {
		if ok, wait := st.requests.take(lim.Requests, 1, n); !ok {
			d.Reason, d.RetryAfter = RequestLimit, wait
		}
	}
	if d.Reason == Admitted && !lim.Tokens.Unlimited() {
		if ok, wait := st.tokens.take(lim.Tokens, float64(reserve), n); !ok {
			// Give back the request taken above: a refusal takes nothing.
			if !lim.Requests.Unlimited() {
				st.requests.charge(lim.Requests, -1, n)
			}
			d.Reason, d.RetryAfter = TokenLimit, wait
		}
	}
	if d.Reason == Admitted {
		d.Lease.Reserved = reserve
		st.inFlight++
		if !lim.Quota.Unlimited() {
			st.quotaUsed += reserve
			d.Lease.Period = st.quotaPeriod
		}
	}
	d.State = st.state(lim, n, now)
	return d
}

// reserve is admit's checks of tokens for a request admitted already and
// holding held: no request is counted and no slot taken.
func (st *clientState) reserve(lim *Limits, held, tokens int64, n int64, now time.Time) Decision {
	d := Decision{}
	switch {
	case tooLarge(lim, held, tokens):
		d.Reason, d.RetryAfter = TooLarge, -1
	case !lim.Quota.Unlimited() && st.quotaUsed+tokens > lim.Quota.N:
		d.Reason, d.RetryAfter = QuotaLimit, lim.Quota.Period.End(now).Sub(now)
	case !lim.Tokens.Unlimited():
		if ok, wait := st.tokens.take(lim.Tokens, float64(tokens), n); !ok {
			d.Reason, d.RetryAfter = TokenLimit, wait
		}
	}
	if d.Reason == Admitted && !lim.Quota.Unlimited() {
		st.quotaUsed += tokens
	}
	d.State = st.state(lim, n, now)
	return d
}

func (st *clientState) state(lim *Limits, n int64, now time.Time) State {
	var s State
	if !lim.Requests.Unlimited() {
		s.RequestsRemaining, s.RequestsReset = st.requests.remaining(lim.Requests, n)
	}
	if !lim.Tokens.Unlimited() {
		s.TokensRemaining, s.TokensReset = st.tokens.remaining(lim.Tokens, n)
	}
	if !lim.Quota.Unlimited() {
		s.QuotaUsed = st.quotaUsed
		s.QuotaReset = lim.Quota.Period.End(now)
	}
	s.InFlight = int(st.inFlight)
	return s
}

// Interface guards
var _ Limiter = (*Memory)(nil)
