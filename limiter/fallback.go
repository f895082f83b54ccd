package limiter

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// OnError says what a Fallback does when its shared backend fails.
type OnError uint8

const (
	// UseLocal decides with in-memory limits, per instance, what the
	// instance can prove the fleet has not spent: its share of what the
	// rate limits refill during the outage (see Fallback). Whatever else
	// is refused, so that the fleet never admits more than its limits.
	UseLocal OnError = iota
	// Deny refuses requests until the shared backend answers again.
	Deny
	// UseLocalUnshared decides with in-memory limits, per instance, each
	// with the whole limits, and a quota or budget the instance has no
	// figure of starts from zero: the fleet may admit up to as many times
	// its limits, and spend as many times its budgets, as it has
	// instances. Only for an operator who prefers that to refusals.
	UseLocalUnshared
)

// ErrUnavailable is the error of a Fallback that cannot decide without its
// shared backend: set to Deny, or, under UseLocal, a call that failed
// alone, or a client whose limits leave the instance no share it can
// prove (see Fallback).
var ErrUnavailable = errors.New("the shared limiter is unavailable")

// Shared is the backend of a Fallback: a Limiter that the instances of a
// fleet share (Redis). Its calls bound their own waits, and fail with
// ErrDown, at once, while the backend is held for down.
type Shared interface {
	Limiter
	DeferredSettler
	// Charge adds to the client's limits requests and tokens admitted
	// without the shared backend, when it answers again: queued, and
	// retried until it lands.
	Charge(client string, lim *Limits, requests, tokens int64)
	// Instances is how many instances share the backend, as last seen,
	// this one included; 0 while some live instance may not count this
	// one yet, which then has no share of the limits.
	Instances() int
	// Answers reports whether calls go to the backend: it is not held
	// for down.
	Answers() bool
}

// Fallback puts a shared backend (Redis) first and acts as told by
// OnError when it fails. A call that fails alone (one late answer, a full
// queue) is no outage: it changes no other call, and is refused unless
// the policy is UseLocalUnshared. The shared backend alone says when it is
// down (ErrDown: a round trip failed or was late, and a probe failed too);
// the Fallback is then in force for every call until the backend answers
// again, and logs each change of course once.
//
// The in-memory limits of UseLocal never let the fleet admit more than
// its limits while the instances share one outage. What was left of a
// bucket when the outage began may have been spent by another instance
// after this one last heard of it, so none of it is taken: each instance
// starts its share of a client's buckets empty when the fallback comes in
// force, and refills it at 1/n of the rate, n the live instances (a burst
// of 1/n as well); the fleet's refill during the outage is its own, since
// the backend admits nothing meanwhile. A quota, a budget or a concurrency
// limit has no refill to share, and what other instances hold of it is
// unknown: a client whose tier sets one is refused (ErrUnavailable), and
// so is one whose share is below one unit, or any client while an
// instance that joined lately may not be counted by all (Instances is 0).
// Whatever the local limits admitted is charged to the shared backend once
// it answers again, before the next call sent there (payFirst), so that
// the requests and tokens served during an outage count against the
// limits afterwards. An instance cut off from a
// backend that other instances still reach takes its share on top of what
// the backend admits: it is charged, into debt, once it answers.
//
// Use NewFallback; it is safe for concurrent use.
type Fallback struct {
	shared Shared
	local  *Memory
	policy OnError
	logger *zap.Logger

	down  atomic.Bool
	since atomic.Int64 // unix nanoseconds: when the fallback came in force; 0 while not
	// OnChange, when set, is called with true when the fallback starts and
	// false when it ends, for metrics.
	OnChange func(down bool)

	shares    sync.Map // *Limits → *share: the limits divided among the instances
	sharesLen atomic.Int32

	owedMu sync.Mutex        // protects owed
	owed   map[string]*owing // what the local limits admitted, to charge
	owing  atomic.Bool       // owed is not empty
}

// share is a tier's limits divided among n instances.
type share struct {
	n   int
	lim Limits
	ok  bool // the instance may decide with it: see Fallback
}

// owing is what the local limits admitted for a client, for the shared
// backend.
type owing struct {
	lim      *Limits
	requests int64
	tokens   int64
}

// maxShares bounds the divided limits kept; past it they are made again.
const maxShares = 4096

// NewFallback returns a Fallback on shared, with in-memory limits for up
// to maxClients clients.
func NewFallback(shared Shared, policy OnError, maxClients int, logger *zap.Logger) *Fallback {
	var quota QuotaCounter
	if policy == UseLocal {
		quota = noFigure{} // the fleet's ledger would wait on the failed store
	}
	return newFallback(shared, NewMemory(quota, maxClients), policy, logger)
}

// newFallback is NewFallback with its local limits given: tests look at
// them.
func newFallback(shared Shared, local *Memory, policy OnError, logger *zap.Logger) *Fallback {
	return &Fallback{shared: shared, local: local, policy: policy, logger: logger, owed: make(map[string]*owing)}
}

// noFigure is the QuotaCounter of UseLocal's local limits: a client whose
// quota use the shared backend never told has none to start from.
type noFigure struct{}

func (noFigure) QuotaUsed(context.Context, string, time.Time) (int64, error) {
	return 0, ErrUnavailable
}

// Admit implements Limiter.
func (f *Fallback) Admit(ctx context.Context, client string, lim *Limits, reserve int64, now time.Time) (Decision, error) {
	if err := checkReserve(lim, reserve); err != nil {
		return Decision{}, err // the caller's mistake, not the shared backend's failure
	}
	f.payFirst()
	d, err := f.shared.Admit(ctx, client, lim, reserve, now)
	if err == nil {
		if !d.Lease.fromSlice() { // a slice's admission did not ask Redis
			f.answered(client, lim, &d.State, now)
		}
		return d, nil
	}
	share, err := f.failed(client, lim, err, now)
	if err != nil {
		return Decision{}, err
	}
	d, err = f.local.Admit(ctx, client, share, reserve, now)
	if err != nil {
		return Decision{}, err
	}
	f.fixTooLarge(lim, &d, 0, reserve)
	if d.Reason == Admitted && !lim.Requests.Unlimited() {
		f.owe(client, lim, 1, 0)
	}
	return d, nil
}

// Reserve implements Limiter. A lease from the shared backend (it names its
// slot) reserves there, and one from the local limits locally, since the
// lease's Settle goes to the same backend and must find the reservation
// there.
//
// When the shared backend fails, a shared lease reserves in the local
// limits where the policy decides locally (Fallback), checked as a local
// lease is; Local names that part of the lease, which Settle gives back
// there, while the shared backend is charged all the request used.
// Otherwise the call fails with ErrUnavailable.
func (f *Fallback) Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, now time.Time) (Decision, error) {
	if err := checkReserve(lim, tokens); err != nil {
		return Decision{Lease: lease}, err
	}
	if lease.ID == "" {
		d, err := f.local.Reserve(ctx, client, f.shareFor(client, lim), lease, tokens, now)
		f.fixTooLarge(lim, &d, lease.Reserved, tokens)
		return d, err
	}
	f.payFirst()
	d, err := f.shared.Reserve(ctx, client, lim, lease, tokens, now)
	switch {
	case err == nil:
		f.answered(client, lim, &d.State, now)
		return d, nil
	case errors.Is(err, ErrLeaseGone): // an answer, not a failure
		f.answered(client, lim, nil, now)
		return d, err
	}
	// A lease from a slice comes back named: Redis may have reserved all
	// the same, and Settle corrects that under the name.
	lease = d.Lease
	share, err := f.failed(client, lim, err, now)
	if err != nil {
		return Decision{Lease: lease}, err
	}
	if lease.fromSlice() {
		if f.policy == UseLocal || !lim.Quota.Unlimited() {
			// Past its slice, a sliced lease has nothing local to
			// reserve from that Settle would give back; nor may a
			// quota or budget be spent unchecked.
			return Decision{Lease: lease}, ErrUnavailable
		}
		// Without a quota or budget, its tokens are charged to Redis by
		// Settle, unchecked in advance.
		d = Decision{Lease: lease}
		if tooLarge(lim, lease.Reserved, tokens) {
			d.Reason, d.RetryAfter = TooLarge, -1
		}
		return d, nil
	}
	ld, err := f.local.Reserve(ctx, client, share, Lease{}, tokens, now)
	if err != nil {
		return Decision{Lease: lease}, err
	}
	d = Decision{Reason: ld.Reason, RetryAfter: ld.RetryAfter, Lease: lease, State: ld.State}
	f.fixTooLarge(lim, &d, lease.Reserved, tokens)
	if d.Reason == Admitted {
		d.Lease.Reserved += tokens
		d.Lease.Local += tokens
	}
	return d, nil
}

// fixTooLarge turns a local TooLarge of a request that the whole limits
// admit (it passes only the instance's share of the burst) into a token
// refusal to retry: waiting for Redis may admit it.
func (f *Fallback) fixTooLarge(lim *Limits, d *Decision, held, tokens int64) {
	if d.Reason == TooLarge && !tooLarge(lim, held, tokens) {
		d.Reason, d.RetryAfter = TokenLimit, time.Second
	}
}

// Settle implements Limiter. A lease from the shared backend (it names its
// slot) goes back there, and what it reserved locally (Local) and did not
// use is given back locally; one from the local limits stays local, and
// what it used is owed to the shared backend.
func (f *Fallback) Settle(ctx context.Context, client string, lim *Limits, lease Lease, used int64, now time.Time) error {
	if lease.ID == "" {
		f.oweUse(client, lim, used)
		return f.local.Settle(ctx, client, f.shareFor(client, lim), lease, used, now)
	}
	lease = f.localPart(client, lim, lease, used, now)
	err := f.shared.Settle(ctx, client, lim, lease, used, now)
	if err != nil && errors.Is(err, ErrDown) {
		f.markDown(err, now)
	}
	return err
}

// SettleDeferred implements DeferredSettler: a lease from the shared
// backend goes back there without waiting (see DeferredSettler), and one
// from the local limits is settled at once, which costs no wait.
func (f *Fallback) SettleDeferred(client string, lim *Limits, lease Lease, used int64, now time.Time) {
	if lease.ID == "" {
		f.oweUse(client, lim, used)
		f.local.Settle(context.Background(), client, f.shareFor(client, lim), lease, used, now)
		return
	}
	f.shared.SettleDeferred(client, lim, f.localPart(client, lim, lease, used, now), used, now)
}

// localPart gives back what a shared lease reserved in the local limits
// and did not use, and returns the lease as the shared backend knows it.
// What it used past its shared reservation came from the local limits and
// stays spent there: the shared backend is charged all of it only once it
// answers again, and until then the outage's share must not lend the same
// tokens to the next request.
func (f *Fallback) localPart(client string, lim *Limits, lease Lease, used int64, now time.Time) Lease {
	if lease.Local == 0 || lease.fromSlice() {
		return lease
	}
	spent := min(max(used-(lease.Reserved-lease.Local), 0), lease.Local)
	f.local.refund(client, f.shareFor(client, lim), lease.Local-spent, now)
	lease.Reserved -= lease.Local
	lease.Local = 0
	return lease
}

// State implements Limiter.
func (f *Fallback) State(ctx context.Context, client string, lim *Limits, now time.Time) (State, error) {
	s, err := f.shared.State(ctx, client, lim, now)
	if err == nil {
		f.answered(client, lim, &s, now)
		return s, nil
	}
	share, err := f.failed(client, lim, err, now)
	if err != nil {
		return State{}, err
	}
	return f.local.State(ctx, client, share, now)
}

// answered records a shared answer: the fallback, if in force, ends, what
// the local limits admitted is charged, and under UseLocalUnshared the
// client's quota use in s (nil for none) is noted to start from.
func (f *Fallback) answered(client string, lim *Limits, s *State, now time.Time) {
	if f.down.Load() {
		f.recovered()
	}
	switch {
	case s == nil || f.policy == Deny:
	case f.policy == UseLocalUnshared:
		if !lim.Quota.Unlimited() {
			f.local.NoteSharedQuota(client, lim, s.QuotaUsed, s.QuotaReset, now)
		}
	}
	// After the note, which counts what is owed on top of s: the charge
	// reaches Redis after the answer s.
	if f.owing.Load() {
		f.pay()
	}
}

// failed handles a failed shared call: it returns the limits to decide
// with locally, or the error to return.
func (f *Fallback) failed(client string, lim *Limits, err error, now time.Time) (*Limits, error) {
	if errors.Is(err, ErrDown) {
		f.markDown(err, now)
	}
	switch f.policy {
	case Deny:
		return nil, ErrUnavailable
	case UseLocalUnshared:
		return lim, nil
	}
	since := f.since.Load()
	if since == 0 || !f.down.Load() {
		return nil, ErrUnavailable // one failed call: the others' use meanwhile is unknown
	}
	sh := f.shareOf(lim)
	if !sh.ok {
		return nil, ErrUnavailable
	}
	f.local.startShare(client, &sh.lim, since)
	return &sh.lim, nil
}

// share returns the limits the local limits decide with: lim divided
// among the instances under UseLocal.
func (f *Fallback) share(lim *Limits) *Limits {
	if f.policy != UseLocal {
		return lim
	}
	return &f.shareOf(lim).lim
}

// shareFor is share, for a call of client's to the local limits: they
// count its buckets in that share from now on (see Memory.followShare).
func (f *Fallback) shareFor(client string, lim *Limits) *Limits {
	sh := f.share(lim)
	if sh != lim {
		f.local.followShare(client, sh)
	}
	return sh
}

// shareOf returns lim divided among the live instances: each rate's
// window multiplied by n and its burst divided by it, so that the fleet
// refills at the rate and holds the burst. It is not ok (see Fallback)
// with a quota, a budget or a concurrency limit, a burst below one unit
// each, or no count of the instances.
func (f *Fallback) shareOf(lim *Limits) *share {
	n := f.shared.Instances()
	if v, ok := f.shares.Load(lim); ok {
		if sh := v.(*share); sh.n == n {
			return sh
		}
	}
	sh := &share{n: n, lim: *lim, ok: n > 0 && lim.Concurrent <= 0 && lim.Quota.Unlimited()}
	for _, r := range []*Rate{&sh.lim.Requests, &sh.lim.Tokens} {
		if r.Unlimited() || n == 0 {
			continue
		}
		r.Burst = r.Capacity() / int64(n)
		r.Window *= time.Duration(n)
		if r.Burst < 1 {
			sh.ok = false
		}
	}
	if f.sharesLen.Add(1) > maxShares {
		f.shares.Clear()
		f.sharesLen.Store(0)
	}
	f.shares.Store(lim, sh)
	return sh
}

// owe records what the local limits admitted for the shared backend.
func (f *Fallback) owe(client string, lim *Limits, requests, tokens int64) {
	f.owedMu.Lock()
	o := f.owed[client]
	if o == nil {
		o = &owing{}
		f.owed[client] = o
	}
	o.lim = lim
	o.requests += requests
	o.tokens += tokens
	f.owedMu.Unlock()
	f.owing.Store(true)
}

// oweUse records the tokens a local lease used, when a limit counts them.
func (f *Fallback) oweUse(client string, lim *Limits, used int64) {
	if used > 0 && (!lim.Tokens.Unlimited() || !lim.Quota.Unlimited()) {
		f.owe(client, lim, 0, used)
	}
}

// payFirst charges the shared backend what the local limits admitted,
// once it answers again, before the call about to be sent there: the
// backend refilled its buckets over the outage as the local limits did,
// and a call that reached it before the charge would be admitted from
// that refill a second time. A client's calls go to the backend in
// order (Redis' queues), so the charge is decided before the call.
func (f *Fallback) payFirst() {
	if f.owing.Load() && f.shared.Answers() {
		f.pay()
	}
}

// pay charges the shared backend what the local limits admitted. The
// charges are queued under owedMu, and owing cleared after them: a call
// that finds nothing owed is queued behind them.
func (f *Fallback) pay() {
	f.owedMu.Lock()
	defer f.owedMu.Unlock()
	for client, o := range f.owed {
		f.shared.Charge(client, o.lim, o.requests, o.tokens)
		f.local.paid(client, o.tokens)
	}
	if n := len(f.owed); n > 0 {
		f.logger.Info("charged the shared limiter what local limits admitted while it failed", zap.Int("clients", n))
		f.owed = make(map[string]*owing)
	}
	f.owing.Store(false)
}

// Down reports whether the fallback is in force.
func (f *Fallback) Down() bool { return f.down.Load() }

func (f *Fallback) markDown(err error, now time.Time) {
	if f.down.Load() {
		return
	}
	f.since.CompareAndSwap(0, now.UnixNano())
	if !f.down.CompareAndSwap(false, true) {
		return
	}
	what := "deciding with local in-memory limits, each instance its share of what they refill meanwhile; callers with a quota, budget or concurrency limit are refused"
	switch f.policy {
	case Deny:
		what = "refusing requests"
	case UseLocalUnshared:
		what = "deciding with local in-memory limits, each instance the whole limits"
	}
	f.logger.Error("the shared limiter failed; "+what+" until it answers again", zap.Error(err))
	if f.OnChange != nil {
		f.OnChange(true)
	}
}

func (f *Fallback) recovered() {
	if !f.down.CompareAndSwap(true, false) {
		return
	}
	f.since.Store(0)
	f.logger.Info("the shared limiter answers again; limits hold across instances again")
	if f.OnChange != nil {
		f.OnChange(false)
	}
}

// Interface guards
var (
	_ Limiter         = (*Fallback)(nil)
	_ DeferredSettler = (*Fallback)(nil)
	_ Shared          = (*Redis)(nil)
)
