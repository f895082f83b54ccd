package limiter

import (
	"context"
	"hash/maphash"
	"math"
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
// the QuotaCounter. Without a QuotaCounter, a client's quota use cannot be
// read back, so a client with quota use is kept until its period ends.
// MaxClients bounds memory beyond that.
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

// clientState is one client's standing: 64 bytes.
type clientState struct {
	requests bucket
	tokens   bucket
	lim      *Limits // of the client's last request, to judge it idle
	// quotaUsed is the quota use of the period quotaDay starts: the
	// QuotaCounter's figure, or the shared limiter's (NoteSharedQuota),
	// plus quotaOwn, what this Memory counted itself since.
	quotaUsed int64
	quotaOwn  int64
	// quotaDay is the first day of the period quotaUsed counts, in days
	// since the Unix epoch (a day number keeps the state at 64 bytes);
	// 0: not loaded.
	quotaDay int32
	inFlight int32
}

const nanosPerDay = int64(24 * time.Hour)

// period returns the start of the quota period the client's use counts
// in, in unix nanoseconds as Lease.Period names it; 0: not loaded.
func (st *clientState) period() int64 { return int64(st.quotaDay) * nanosPerDay }

// startPeriod starts counting the quota period that starts at period
// (unix nanoseconds) from used, none of it counted here.
func (st *clientState) startPeriod(period, used int64) {
	st.quotaDay, st.quotaUsed, st.quotaOwn = int32(period/nanosPerDay), used, 0
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
	if err := checkReserve(lim, reserve); err != nil {
		return Decision{}, err
	}
	s, st, _, err := m.lockedState(ctx, client, lim, now)
	if err != nil {
		return Decision{}, err
	}
	defer s.mu.Unlock()
	n := now.UnixNano()
	d := st.admit(lim, reserve, n, now)
	if s.ops++; s.ops%sweepEvery == 0 {
		m.sweep(s, n, false)
	}
	return d, nil
}

// Reserve implements Limiter. The tokens count in the quota of the period
// at now, which the lease then names for its Settle.
func (m *Memory) Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, now time.Time) (Decision, error) {
	if err := checkReserve(lim, tokens); err != nil {
		return Decision{Lease: lease}, err
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
	st := m.get(s, client, now.UnixNano(), lim)
	if period != 0 && st.period() != period {
		// Forgotten or rolled over since loadQuota: count from what it read.
		st.quotaDay = int32(period / nanosPerDay)
	}
	return s, st, period, nil
}

// Settle implements Limiter.
func (m *Memory) Settle(_ context.Context, client string, lim *Limits, lease Lease, used int64, now time.Time) error {
	if lease.holdsNothing(lim, used) {
		return nil
	}
	s := m.shard(client)
	n := now.UnixNano()
	s.mu.Lock()
	defer s.mu.Unlock()
	st := m.get(s, client, n, lim)
	if st.inFlight > 0 && !lim.NoSlot {
		st.inFlight--
	}
	delta := used - lease.Reserved
	if !lim.Tokens.Unlimited() {
		st.tokens.charge(lim.Tokens, float64(delta), n)
	}
	// The quota is corrected in the period the reservation counts in, as
	// Redis does: once that period is over, the new one owes nothing of
	// it, and its refund must not be spent again there.
	if !lim.Quota.Unlimited() && (lease.Period == 0 || lease.Period == st.period()) {
		st.quotaUsed = max(addCount(st.quotaUsed, delta), 0)
		st.quotaOwn = max(addCount(st.quotaOwn, delta), 0)
	}
	return nil
}

// NoteSharedQuota takes the client's quota use as a shared limiter
// reported it: used tokens in the period that ends at end. When this
// Memory decides in the shared limiter's place (see Fallback), it counts
// that period from used plus what it counted itself in the period, which
// the shared limiter does not know. A figure of an earlier period than
// the one the client's use counts in is ignored: that period is over. It
// allocates nothing for a client this Memory remembers.
func (m *Memory) NoteSharedQuota(client string, lim *Limits, used int64, end, now time.Time) {
	if lim.Quota.Unlimited() || end.IsZero() {
		return
	}
	s := m.shard(client)
	s.mu.Lock()
	st := m.get(s, client, now.UnixNano(), lim)
	st.noteQuota(lim, used, end)
	s.mu.Unlock()
}

// noteQuota is NoteSharedQuota on the client's state, locked.
func (st *clientState) noteQuota(lim *Limits, used int64, end time.Time) {
	period := lim.Quota.Period.Start(end.Add(-time.Nanosecond)).UnixNano()
	switch p := st.period(); {
	case p == period:
		st.quotaUsed = addCount(used, st.quotaOwn)
	case p < period:
		st.startPeriod(period, used)
	}
}

// startShare starts the client's buckets empty at since (unix
// nanoseconds), unless this Memory used them since then: while it decides
// in a shared limiter's place (see Fallback), a client has what share,
// its limits as divided, refilled since the outage began, and nothing of
// what was left before. A bucket used under another share keeps how
// spent it was (followShare). It allocates nothing for a client this
// Memory remembers.
func (m *Memory) startShare(client string, share *Limits, since int64) {
	sh := m.shard(client)
	sh.mu.Lock()
	if st, ok := sh.m[client]; ok {
		st.follow(share)
	}
	st := m.get(sh, client, since, share)
	st.requests.startShare(share.Requests, since)
	st.tokens.startShare(share.Tokens, since)
	sh.mu.Unlock()
}

// followShare has the client's buckets counted in share from now on, when
// the share a Fallback decides with changed (the count of live instances
// did): a bucket counted in another share keeps how spent it was.
func (m *Memory) followShare(client string, share *Limits) {
	sh := m.shard(client)
	sh.mu.Lock()
	if st, ok := sh.m[client]; ok {
		st.follow(share)
		st.lim = share
	}
	sh.mu.Unlock()
}

// follow scales the buckets counted in the client's last limits to share:
// a bucket spent under a share of 1,000 is spent under one of 500, not
// 500 in debt.
func (st *clientState) follow(share *Limits) {
	if was := st.lim; was != nil && was != share {
		st.requests.scale(was.Requests, share.Requests)
		st.tokens.scale(was.Tokens, share.Tokens)
	}
}

// paid notes that tokens this Memory counted in the client's quota reached
// the shared limiter (Fallback's Charge): its figures count them from now
// on, and noteQuota must not add them again.
func (m *Memory) paid(client string, tokens int64) {
	sh := m.shard(client)
	sh.mu.Lock()
	if st, ok := sh.m[client]; ok {
		st.quotaOwn = max(st.quotaOwn-tokens, 0)
	}
	sh.mu.Unlock()
}

// refund gives back tokens reserved at now by Reserve for a request whose
// slot is not this Memory's (a shared lease, see Fallback.Reserve).
func (m *Memory) refund(client string, lim *Limits, tokens int64, now time.Time) {
	sh := m.shard(client)
	t := now.UnixNano()
	sh.mu.Lock()
	st := m.get(sh, client, t, lim)
	if !lim.Tokens.Unlimited() {
		st.tokens.charge(lim.Tokens, -float64(tokens), t)
	}
	if !lim.Quota.Unlimited() {
		st.quotaUsed = max(addCount(st.quotaUsed, -tokens), 0)
		st.quotaOwn = max(addCount(st.quotaOwn, -tokens), 0)
	}
	sh.mu.Unlock()
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
	known := ok && st.period() == period
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
	st = m.get(s, client, now.UnixNano(), lim)
	if st.period() != period {
		st.startPeriod(period, used)
	}
	s.mu.Unlock()
	return period, nil
}

func (m *Memory) shard(client string) *memShard {
	return &m.shards[maphash.String(m.seed, client)%memShards]
}

// get returns the client's state in s (locked by the caller), creating
// it. When the shard is full it first forgets idle clients, and if none is
// idle, one arbitrary client: that client gets a fresh start, the price of
// bounded memory.
func (m *Memory) get(s *memShard, client string, now int64, lim *Limits) *clientState {
	if st, ok := s.m[client]; ok {
		st.lim = lim
		return st
	}
	if len(s.m) >= m.perShard {
		m.sweep(s, now, true)
		if len(s.m) >= m.perShard {
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

// sweep forgets a few idle clients of s (locked by the caller). Only
// when the shard is full (pressed) does it forget a client whose quota
// use the QuotaCounter could read back: reading it back is I/O, which
// the next request of a client with a quota and no other limit (a
// budget's account) would otherwise do every time.
func (m *Memory) sweep(s *memShard, now int64, pressed bool) {
	checked := 0
	for c, st := range s.m {
		if checked++; checked > sweepBatch {
			return
		}
		if st.idle(now, pressed && m.quota != nil) {
			delete(s.m, c)
		}
	}
}

// idle reports whether forgetting the client at now loses nothing:
// nothing in flight, both buckets full again, and no quota use in the
// current period unless a QuotaCounter reads it back (counted).
func (st *clientState) idle(now int64, counted bool) bool {
	lim := st.lim
	if st.inFlight > 0 {
		return false
	}
	if !lim.Requests.Unlimited() && !st.requests.full(lim.Requests, now) {
		return false
	}
	if !lim.Tokens.Unlimited() && !st.tokens.full(lim.Tokens, now) {
		return false
	}
	return counted || st.quotaUsed == 0 || lim.Quota.Unlimited() ||
		now >= lim.Quota.Period.End(time.Unix(0, st.period())).UnixNano()
}

func (st *clientState) admit(lim *Limits, reserve int64, n int64, now time.Time) Decision {
	d := Decision{}
	switch {
	case tooLarge(lim, 0, reserve):
		d.Reason, d.RetryAfter = TooLarge, -1
	case lim.Concurrent > 0 && int(st.inFlight) >= lim.Concurrent:
		d.Reason, d.RetryAfter = ConcurrencyLimit, time.Second
	case !lim.Quota.Unlimited() && reserve > lim.Quota.N-st.quotaUsed:
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
		if !lim.NoSlot {
			st.inFlight++
		}
		if !lim.Quota.Unlimited() {
			st.quotaUsed = addCount(st.quotaUsed, reserve)
			st.quotaOwn = addCount(st.quotaOwn, reserve)
			d.Lease.Period = st.period()
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
	case !lim.Quota.Unlimited() && tokens > lim.Quota.N-st.quotaUsed:
		d.Reason, d.RetryAfter = QuotaLimit, lim.Quota.Period.End(now).Sub(now)
	case !lim.Tokens.Unlimited():
		if ok, wait := st.tokens.take(lim.Tokens, float64(tokens), n); !ok {
			d.Reason, d.RetryAfter = TokenLimit, wait
		}
	}
	if d.Reason == Admitted && !lim.Quota.Unlimited() {
		st.quotaUsed = addCount(st.quotaUsed, tokens)
		st.quotaOwn = addCount(st.quotaOwn, tokens)
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

// addCount adds b to the count a, saturating at the int64 bounds: a
// quota use read back saturated (the ledger's sums saturate) must never
// wrap into room to spend.
func addCount(a, b int64) int64 {
	s := a + b
	if (s > a) != (b > 0) {
		if b > 0 {
			return math.MaxInt64
		}
		return math.MinInt64
	}
	return s
}

// Interface guards
var _ Limiter = (*Memory)(nil)
