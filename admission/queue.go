package admission

import (
	"context"
	"net/http"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/limiter"
)

// UpstreamPrefix names a site's upstream account in the limiter, the
// upstream_limits of every caller of the site together: with a shared
// limiter (Redis) the fleet's instances hold them together, exactly.
const UpstreamPrefix = "upstream:"

// QueuePoll is how often a queue with waiters asks the limiter again
// when nothing it knows of has freed capacity: slots other instances of
// a fleet freed, which no settle of its own tells it of.
const QueuePoll = 25 * time.Millisecond

// OwnPoll is how often a request waiting for a slot of its caller's own
// asks again, for slots its caller's requests on other instances of a
// fleet freed: one here wakes it at once (Released). Each waiter asks on
// its own, so this is slower than QueuePoll, the one dispatcher's: a
// full queue of such waiters asks the store length/OwnPoll times a
// second.
const OwnPoll = 250 * time.Millisecond

// TierQueue is how a tier's requests queue.
type TierQueue struct {
	Weight    int           // 1 to 1000; 0 is 1
	MaxWait   time.Duration // 0: no waiting, an instant 429
	PerCaller int           // places one caller may hold; 0: the queue's
}

// QueueConfig configures a Queue.
type QueueConfig struct {
	Limiter limiter.Limiter
	// Account is the upstream's account in the limiter (UpstreamPrefix
	// and the site's fingerprint) and Limits its upstream_limits; nil
	// Limits: none, and the queue only waits for callers' own slots.
	Account string
	Limits  *limiter.Limits
	// Exhausted, when set, is the upstream's own word that it takes no
	// request now (every server key spent), and for how long: the
	// capacity the proxy learned, which the queue waits out in order as
	// it waits for the upstream_limits. A call that answers false may
	// have been let through as the upstream's probe, and must be sent.
	Exhausted func(ctx context.Context, now time.Time) (time.Duration, bool)
	// Length bounds the waiters of the site; PerCaller those of one
	// caller, unless its tier sets its own.
	Length, PerCaller int
	Tiers             map[string]TierQueue
	Default           TierQueue // a tier not in Tiers
	// OnLength, when set, is told each change of a tier's waiters,
	// outside the queue's lock (the length gauge).
	OnLength func(tier string, delta int)
	Logger   *zap.Logger
	Now      func() time.Time // default time.Now; tests step it
}

// A Queue lets a site's requests wait, in a weighted fair order, for
// what they need to go on: the upstream_limits' capacity (one limiter
// account for the site) and their callers' own concurrency slots. One
// dispatcher goroutine admits the waiters in order as capacity frees;
// each waiter blocks on its own channel. The queue is per instance: in a
// fleet the limits are exact (the limiter's) and the order approximate.
//
// It is safe for concurrent use. Start runs its dispatcher, Stop ends it.
type Queue struct {
	cfg  QueueConfig
	wake chan struct{} // buffered 1: a release, a newcomer
	stop chan struct{}
	done chan struct{}

	mu    sync.Mutex // protects the fields below
	order sched
	own   map[string]*ownWait // callers waiting for their own slots
	ownN  int
	rate  dispatchRate
	pace  pace // learned from the upstream's word, when it gates (Exhausted)
}

// ownWait is the callers' waiters for their own concurrency slots: no
// order between callers is needed, each waits for its own slots.
type ownWait struct {
	n    int
	free chan struct{} // buffered 1: one of the caller's slots was freed
}

// waiter is one request waiting for the upstream's capacity.
type waiter struct {
	reserve int64
	ready   chan struct{} // buffered 1: granted or refused
	tq      *tierQueue    // while queued
	cq      *callerQueue
	state   uint8 // waiting, granted, left
	lease   limiter.Lease
	refusal *Refusal // when the dispatcher refused it
	tier    string
	again   bool // holds its place on the account already (Turn.Again)
}

const (
	waiting uint8 = iota
	granted
	left
)

// NewQueue returns a queue of cfg; Start runs it.
func NewQueue(cfg QueueConfig) *Queue {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Queue{
		cfg: cfg, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}),
		order: newSched(), own: make(map[string]*ownWait),
	}
}

// Start runs the dispatcher until Stop; a queue that gates nothing of
// the upstream's needs none.
func (q *Queue) Start() {
	if !q.Gates() {
		close(q.done)
		return
	}
	go q.run()
}

// Stop ends the dispatcher and waits for it: at once when nothing
// waits, else once every waiter was served or left (by its max_wait at
// the latest).
func (q *Queue) Stop() {
	close(q.stop)
	<-q.done
}

// Spent tells the queue that the upstream said at now that a server key
// is spent: its learned pace is cut (pace).
func (q *Queue) Spent(now time.Time) { q.pace.spent(now) }

// Served tells the queue that the upstream answered a request with
// success at now (its headers: a stream's too, long before it ends),
// which the learned pace counts.
func (q *Queue) Served(now time.Time) {
	if q.cfg.Exhausted != nil {
		q.pace.answered(now)
	}
}

// Learns reports whether the queue waits out the upstream's word and
// learns its pace (Exhausted).
func (q *Queue) Learns() bool { return q != nil && q.cfg.Exhausted != nil }

// Gates reports whether the queue gates the upstream: its
// upstream_limits, or its learned capacity.
// A nil queue gates nothing.
func (q *Queue) Gates() bool { return q != nil && (q.cfg.Limits != nil || q.cfg.Exhausted != nil) }

// take asks for the upstream's capacity for a request reserving
// reserve tokens at now: the upstream's own word first, then the
// upstream_limits unless account is false (the request holds its place
// there already). Not now, it says how long until it may be: exhausted
// when the upstream's word stopped it.
func (q *Queue) take(ctx context.Context, reserve int64, account bool, now time.Time) (lease limiter.Lease, retry time.Duration, exhausted bool, f *Refusal) {
	if q.cfg.Exhausted != nil {
		if wait, ex := q.cfg.Exhausted(ctx, now); ex {
			return lease, max(wait, time.Millisecond), true, nil
		}
		if wait := q.pace.take(now); wait > 0 {
			return lease, wait, false, nil
		}
	}
	if q.cfg.Limits == nil || !account {
		return lease, 0, false, nil
	}
	d, err := q.cfg.Limiter.Admit(ctx, q.cfg.Account, q.cfg.Limits, reserve, now)
	switch {
	case err != nil:
		return lease, 0, false, q.unavailable(err)
	case d.Reason == limiter.TooLarge:
		return lease, 0, false, &Refusal{Err: errUpstreamTooLarge()}
	case d.Reason != limiter.Admitted:
		return lease, max(d.RetryAfter, time.Millisecond), false, nil
	}
	return d.Lease, 0, false, nil
}

// tierOf returns how the tier named tier queues.
func (q *Queue) tierOf(tier string) TierQueue {
	t, ok := q.cfg.Tiers[tier]
	if !ok {
		t = q.cfg.Default
	}
	if t.PerCaller == 0 {
		t.PerCaller = q.cfg.PerCaller
	}
	return t
}

// MaxWait is how long a request of tier may wait; 0 for none.
func (q *Queue) MaxWait(tier string) time.Duration { return q.tierOf(tier).MaxWait }

// A Turn is a request asking for the upstream's capacity.
type Turn struct {
	Tier, Caller string
	Reserve      int64         // its tokens reserved, taken on the upstream's account
	Spent        time.Duration // of its max_wait, what it waited already
	// Waiting, when set, is called once before the request queues: a
	// body it holds can then shrink to what it sends.
	Waiting func()
	// Again says the request holds its place on the upstream's account
	// already: a retry of one the upstream answered that every key is
	// spent. It waits for the upstream's word and the pace alone.
	Again bool
}

// Upstream admits a request on the upstream's account, reserving its
// tokens, waiting (what is left of max_wait after t.Spent) for its turn
// when the account is full, the upstream's word stops it, or others
// wait. It returns the lease to settle (Admission's JoinUpstream), how
// long it waited, or the refusal when it may not wait or waited in vain.
// A request whose context ends while it waits leaves its place at once.
func (q *Queue) Upstream(ctx context.Context, t Turn) (limiter.Lease, time.Duration, *Refusal) {
	tier, caller, reserve, spent := t.Tier, t.Caller, t.Reserve, t.Spent
	cfg := q.tierOf(tier)
	if cfg.MaxWait > 0 {
		// What is left of its wait: it waited already for its own slot,
		// or for the upstream's exhaustion.
		cfg.MaxWait = max(cfg.MaxWait-spent, time.Nanosecond)
	}
	start := q.cfg.Now()
	q.mu.Lock()
	empty := q.order.n == 0
	q.mu.Unlock()
	var retry time.Duration
	exhausted := false
	if empty {
		// The fast path: nothing queued, one question. A newcomer queued
		// meanwhile may be passed by this one: the order is exact
		// between waiters, not to the microsecond at its door.
		lease, wait, ex, f := q.take(ctx, reserve, !t.Again, start)
		if f != nil {
			return limiter.Lease{}, 0, f
		}
		if wait == 0 {
			return lease, 0, nil // no backlog: says nothing of the pace
		}
		retry, exhausted = wait, ex
	}
	if cfg.MaxWait <= 0 {
		if exhausted {
			return limiter.Lease{}, 0, &Refusal{Err: api.UpstreamExhausted("", api.RetrySeconds(retry))}
		}
		return limiter.Lease{}, 0, &Refusal{Err: errUpstreamBusy(max(retry, q.promise(tier, caller, cfg, start)))}
	}

	if t.Waiting != nil {
		t.Waiting()
	}
	w := &waiter{reserve: reserve, ready: make(chan struct{}, 1), tier: tier, again: t.Again}
	q.mu.Lock()
	if f := q.refuseEarly(tier, caller, cfg, start); f != nil {
		q.mu.Unlock()
		return limiter.Lease{}, 0, f
	}
	formed := q.order.n == 0
	err := q.order.push(w, tier, cfg.Weight, caller, q.cfg.Length, cfg.PerCaller, q.ownOf(caller))
	if err == nil && formed {
		q.rate.formed(start)
	}
	var promise time.Duration
	if err != nil {
		promise = q.promiseLocked(tier, caller, cfg, start)
	}
	q.mu.Unlock()
	if err != nil {
		return limiter.Lease{}, 0, &Refusal{Err: errQueueFull(err == errCallerFull, promise)}
	}
	q.changed(tier, 1)
	q.poke()

	timer := time.NewTimer(cfg.MaxWait)
	defer timer.Stop()
	select {
	case <-w.ready:
	case <-ctx.Done():
	case <-timer.C:
	}
	q.mu.Lock()
	state := w.state
	if state == waiting {
		w.state = left
		q.order.remove(w)
	}
	var promise2 time.Duration
	if state == waiting && ctx.Err() == nil {
		promise2 = q.promiseLocked(tier, caller, cfg, q.cfg.Now())
	}
	q.mu.Unlock()
	waited := q.cfg.Now().Sub(start)
	switch {
	case state == waiting:
		q.changed(tier, -1)
		q.poke() // its place may have been the head's
		if ctx.Err() != nil {
			return limiter.Lease{}, waited, &Refusal{Err: errQueueLeft}
		}
		return limiter.Lease{}, waited, &Refusal{Err: errQueueTimeout(cfg.MaxWait, promise2)}
	case w.refusal != nil:
		return limiter.Lease{}, waited, w.refusal
	}
	return w.lease, waited, nil
}

// refuseEarly is the refusal of a newcomer of caller the queue knows it
// cannot serve within its max_wait, from the measured dispatch rate and
// the places before it; nil when it may wait. Called with q.mu held.
func (q *Queue) refuseEarly(tier, caller string, cfg TierQueue, now time.Time) *Refusal {
	per := q.rate.interval(now)
	if per <= 0 {
		return nil // not measured: it may wait, and may get its turn
	}
	eta := time.Duration(q.order.ahead(tier, caller, cfg.Weight)+1) * per
	if eta <= cfg.MaxWait {
		return nil
	}
	return &Refusal{Err: errQueueTimeout(cfg.MaxWait, eta)}
}

// promise is the Retry-After the queue can honestly give a request of
// caller in tier refused now: the time the places before it take at the
// measured dispatch rate; without a measure, its max_wait.
func (q *Queue) promise(tier, caller string, cfg TierQueue, now time.Time) time.Duration {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.promiseLocked(tier, caller, cfg, now)
}

func (q *Queue) promiseLocked(tier, caller string, cfg TierQueue, now time.Time) time.Duration {
	per := q.rate.interval(now)
	if per <= 0 {
		return max(cfg.MaxWait, time.Second)
	}
	return max(time.Duration(q.order.ahead(tier, caller, cfg.Weight)+1)*per, time.Second)
}

// ownOf is how many places caller holds waiting for its own slots.
// Called with q.mu held.
func (q *Queue) ownOf(caller string) int {
	if o := q.own[caller]; o != nil {
		return o.n
	}
	return 0
}

// placesOf is how many places caller holds in the upstream's order.
// Called with q.mu held.
func (q *Queue) placesOf(caller string) int {
	n := 0
	for _, t := range q.order.tiers {
		if c := t.callers[caller]; c != nil {
			n += len(c.waiters)
		}
	}
	return n
}

// poke wakes the dispatcher.
func (q *Queue) poke() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// Released tells the queue that a request of caller ended, freeing its
// slot and its upstream capacity: the caller's own waiters and the
// dispatcher try again.
func (q *Queue) Released(caller string) {
	q.mu.Lock()
	o := q.own[caller]
	waiters := q.order.n
	q.mu.Unlock()
	if o != nil {
		select {
		case o.free <- struct{}{}:
		default:
		}
	}
	if waiters > 0 {
		q.poke()
	}
}

func (q *Queue) changed(tier string, delta int) {
	if q.cfg.OnLength != nil {
		q.cfg.OnLength(tier, delta)
	}
}

// run is the dispatcher: it admits the head of the order whenever
// something may have freed capacity, and polls while waiters remain.
// Stopped, it goes on until none waits: a config being replaced still
// serves the requests it queued.
func (q *Queue) run() {
	defer close(q.done)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	stop, stopping := q.stop, false
	for {
		select {
		case <-stop:
			stop, stopping = nil, true
		case <-q.wake:
		case <-timer.C:
		}
		next := q.Dispatch()
		if next <= 0 {
			if stopping {
				return
			}
			next = time.Hour
		}
		timer.Reset(next)
	}
}

// Dispatch admits waiters in order while the upstream's account admits
// them, and returns how long until it should try again (0: nothing
// waits). The dispatcher calls it; tests call it by hand.
func (q *Queue) Dispatch() time.Duration {
	ctx := context.Background()
	for {
		q.mu.Lock()
		w := q.order.head()
		q.mu.Unlock()
		if w == nil {
			return 0
		}
		now := q.cfg.Now()
		lease, retry, exhausted, f := q.take(ctx, w.reserve, !w.again, now)
		if retry > 0 {
			if exhausted {
				return retry // the upstream's word: nothing frees it sooner
			}
			return min(retry, QueuePoll)
		}
		q.mu.Lock()
		w.refusal = f
		if w.state != waiting {
			// It left while the limiter decided: its capacity goes back.
			q.mu.Unlock()
			if f == nil {
				q.settle(lease, 0)
			}
			continue
		}
		q.order.dispatch(w)
		w.state = granted
		w.lease = lease
		if w.refusal == nil {
			q.rate.note(now)
		}
		q.mu.Unlock()
		q.changed(w.tier, -1)
		w.ready <- struct{}{}
	}
}

// Settle ends a request's hold on the upstream's account: its slot is
// freed and used replaces its token reservation. The dispatcher then
// tries again.
func (q *Queue) Settle(ctx context.Context, lease limiter.Lease, used int64) {
	q.settle(lease, used)
	q.mu.Lock()
	waiters := q.order.n
	q.mu.Unlock()
	if waiters > 0 {
		q.poke()
	}
}

func (q *Queue) settle(lease limiter.Lease, used int64) {
	if q.cfg.Limits == nil {
		return // only the upstream's word gates: nothing was taken
	}
	if d, ok := q.cfg.Limiter.(limiter.DeferredSettler); ok {
		d.SettleDeferred(q.cfg.Account, q.cfg.Limits, lease, used, time.Now())
		return
	}
	if err := q.cfg.Limiter.Settle(context.Background(), q.cfg.Account, q.cfg.Limits, lease, used, time.Now()); err != nil {
		q.cfg.Logger.Error("settling the upstream's account", zap.Error(err))
	}
}

func (q *Queue) unavailable(err error) *Refusal {
	q.cfg.Logger.Error("deciding the upstream's limits", zap.Error(err))
	e := *ErrUnavailable
	e.RetryAfter = 1
	return &Refusal{Err: &e}
}

// Own waits, up to its tier's max_wait, for a concurrency slot of the
// caller's own, which admit (Admitter.Admit on the caller's accounts)
// takes when it can; admit's first refusal, f, was for concurrency. It
// tries again when one of the caller's requests ends here (Released),
// and every OwnPoll for slots freed by other instances.
func (q *Queue) Own(ctx context.Context, tier, caller string, f *Refusal, admit func(now time.Time) (Admission, *Refusal)) (Admission, time.Duration, *Refusal) {
	cfg := q.tierOf(tier)
	if cfg.MaxWait <= 0 {
		return Admission{}, 0, f
	}
	start := q.cfg.Now()
	q.mu.Lock()
	o := q.own[caller]
	held := q.placesOf(caller)
	if o != nil {
		held += o.n
	}
	full := q.order.n+q.ownN >= q.cfg.Length
	if full || held >= cfg.PerCaller {
		q.mu.Unlock()
		// Its own slot frees when one of its requests ends: its own
		// limit's wait is the honest promise.
		e := errQueueFull(!full, max(f.RetryAfter, time.Second))
		return Admission{}, 0, &Refusal{Err: e, Standing: f.Standing, Refused: f.Refused, Decision: f.Decision}
	}
	if o == nil {
		o = &ownWait{free: make(chan struct{}, 1)}
		q.own[caller] = o
	}
	o.n++
	q.ownN++
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		o.n--
		q.ownN--
		if o.n == 0 {
			delete(q.own, caller)
		}
		q.mu.Unlock()
	}()

	deadline := time.NewTimer(cfg.MaxWait)
	defer deadline.Stop()
	poll := time.NewTicker(OwnPoll)
	defer poll.Stop()
	for {
		select {
		case <-ctx.Done():
			return Admission{}, q.cfg.Now().Sub(start), &Refusal{Err: errQueueLeft}
		case <-deadline.C:
			e := errQueueTimeout(cfg.MaxWait, max(f.RetryAfter, time.Second))
			return Admission{}, q.cfg.Now().Sub(start), &Refusal{Err: e, Standing: f.Standing, Refused: f.Refused, Decision: f.Decision}
		case <-o.free:
		case <-poll.C:
		}
		a, again := admit(q.cfg.Now())
		if again == nil {
			return a, q.cfg.Now().Sub(start), nil
		}
		if again.Reason != limiter.ConcurrencyLimit {
			return a, q.cfg.Now().Sub(start), again
		}
		f = again
	}
}

// JoinUpstream adds the request's hold on the upstream's account to its
// admission, so that its settle frees it on every way out.
func (a *Admission) JoinUpstream(q *Queue, lease limiter.Lease) {
	a.upstream, a.upLease = q, lease
}

// dispatchRate measures how fast the queue dispatches while requests
// wait: the times between its last dispatches, in a ring, each counted
// from the dispatch before it, or from when the backlog formed if later.
// A request let through with nothing queued says nothing of the pace, and
// the time before a backlog formed is idle time: neither is counted, so
// that a site with sparse traffic does not take its idle gaps for its
// pace, and refuse at once a request whose turn would come soon.
type dispatchRate struct {
	gaps [64]time.Duration
	next int
	n    int
	last time.Time // the last dispatch, or when the backlog formed since
}

// formed notes that a backlog formed at now: a request joined the empty
// queue.
func (r *dispatchRate) formed(now time.Time) { r.last = now }

// note notes a dispatch of a waiting request at now.
func (r *dispatchRate) note(now time.Time) {
	if !r.last.IsZero() {
		r.gaps[r.next] = now.Sub(r.last)
		r.next = (r.next + 1) % len(r.gaps)
		r.n = min(r.n+1, len(r.gaps))
	}
	r.last = now
}

// interval is the mean time between dispatches, when the last of them is
// recent (within 10 s of now); 0 when not measured.
func (r *dispatchRate) interval(now time.Time) time.Duration {
	if r.n == 0 || now.Sub(r.last) > 10*time.Second {
		return 0
	}
	var sum time.Duration
	for _, g := range r.gaps[:r.n] {
		sum += g
	}
	return max(sum/time.Duration(r.n), time.Microsecond)
}

// The queue's refusals: 429s of the API's shape, as the limits' are.

func errQueueFull(caller bool, retry time.Duration) *api.Error {
	what := "The queue for the upstream is full."
	if caller {
		what = "You have as many requests waiting as you may."
	}
	s := api.RetrySeconds(retry)
	return &api.Error{
		Status: http.StatusTooManyRequests, Type: "requests", Code: "queue_full", RetryAfter: s,
		Message: what + " Please send fewer requests at once, and try again in " + strconv.Itoa(s) + "s.",
	}
}

func errQueueTimeout(maxWait, retry time.Duration) *api.Error {
	s := api.RetrySeconds(retry)
	return &api.Error{
		Status: http.StatusTooManyRequests, Type: "requests", Code: "queue_timeout", RetryAfter: s,
		Message: "Your request could not get its turn within " + maxWait.String() +
			" while the capacity is in use. Please try again in " + strconv.Itoa(s) + "s.",
	}
}

func errUpstreamBusy(retry time.Duration) *api.Error {
	s := api.RetrySeconds(retry)
	return &api.Error{
		Status: http.StatusTooManyRequests, Type: "requests", Code: "upstream_busy", RetryAfter: s,
		Message: "The proxy's upstream capacity is in use. Please try again in " + strconv.Itoa(s) + "s.",
	}
}

func errUpstreamTooLarge() *api.Error {
	return &api.Error{
		Status: http.StatusTooManyRequests, Type: "tokens", Code: "request_too_large", NoRetry: true,
		Message: "This request asks more tokens than the proxy sends the upstream per window; ask for fewer (max_tokens).",
	}
}

// errQueueLeft answers a caller that hung up while it waited: nobody
// reads it, but the refusal is counted.
var errQueueLeft = &api.Error{
	Status: 499, Type: "requests", Code: "queue_left",
	Message: "The request was cancelled while it waited for its turn.",
}
