package limiter

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/internal/rediserr"
)

// The Redis limiter sends its calls to Redis through queues, each drained
// by one goroutine: whatever is queued while a queue's pipeline is on its
// way goes in its next one, so that concurrent requests share their round
// trips instead of taking one each. A client's calls all go through one
// queue (chosen by its keys' hash), which is FIFO and sends one pipeline
// at a time, so Redis runs them in the order they were made: a request's
// settle, even one nobody waits for (SettleDeferred), runs before the
// client's next admission. Calls of other clients, which touch other
// keys, go in parallel through the other queues.

// queues is the number of queues, and of pipelines on their way at once.
const queues = 8

// maxQueued bounds the calls waiting for a pipeline, over all queues.
// Past a queue's share, a call that waits for its answer fails at once
// with errQueueFull (a failure of that call alone, for its Fallback), and
// a deferred settle goes to the retries.
const maxQueued = 10_000

// maxPerQueue is a queue's share of maxQueued.
const maxPerQueue = maxQueued / queues

// maxPerClient is one client's share of its queue, which it shares with
// one client in queues: past it, its own calls fail with errQueueFull,
// so that one client's burst while Redis is slow leaves room for the
// others' calls. It takes four such clients to fill a queue.
const maxPerClient = maxPerQueue / 4

// flushEvery is how long a pipeline holding only deferred settles waits
// for company; a call that waits for its answer sends it at once.
const flushEvery = 2 * time.Millisecond

// maxPipeline bounds the calls of one pipeline, so that Redis' answer to
// it takes about as long whatever the burst behind it: the timeout bounds
// that answer, and the calls past it wait in their queue for the next
// pipeline, a wait that is not Redis' and that the timeout does not count.
const maxPipeline = 128

// probeTimeout is the least a probe waits for Redis' answer: a Redis that
// answers a PING within it is slow, not down. A call waits for its answer
// as long, so that a late answer is still Redis' decision.
const probeTimeout = time.Second

// probeEvery is how often a Redis held for down is probed, to learn
// whether it answers again; calls fail at once meanwhile, so that an
// outage does not cost every request a wait.
const probeEvery = 250 * time.Millisecond

// ErrDown is the error of a call made while the instance holds its Redis
// for down: a round trip failed or outlasted the timeout, and a probe
// failed too, and none answered since. A Fallback then decides for every
// caller without Redis.
var ErrDown = errors.New("the shared limiter is down")

// errDownUnsent is ErrDown of a call that was never sent. A call sent
// before Redis was held for down fails with ErrDown too, but may still
// run in a Redis that only stalled: what it did must then be undone.
var errDownUnsent = fmt.Errorf("%w; the call was not sent", ErrDown)

// health is what an instance knows of its Redis: whether it is down. A
// round trip that fails, or outlasts the timeout, starts a probe (one at a
// time), and only a failed probe makes an outage: one caller's many
// calls, or one slow answer, cannot.
type health struct {
	down    atomic.Bool
	probing atomic.Bool
	mu      sync.Mutex    // protects verdict
	verdict chan struct{} // closed once the running probe has its first answer
	// probe asks Redis whether it answers; set once, before use, with
	// stop, which ends the probes.
	probe func() error
	stop  <-chan struct{}
	// onChange, when set, is called with the new course (down or not).
	onChange func(down bool, err error)
}

// pass reports whether a call may go to Redis: it is not held for down.
func (h *health) pass() bool { return !h.down.Load() }

// answered records a round trip Redis answered.
func (h *health) answered() {
	if h.down.Load() && h.down.CompareAndSwap(true, false) && h.onChange != nil {
		h.onChange(false, nil)
	}
}

// suspect starts a probe, in the background, unless one runs or Redis is
// held for down already: a failed probe holds it for down, and it is
// probed every probeEvery until it answers.
func (h *health) suspect() {
	if h.down.Load() || !h.probing.CompareAndSwap(false, true) {
		return
	}
	verdict := make(chan struct{})
	h.mu.Lock()
	h.verdict = verdict
	h.mu.Unlock()
	go func() {
		defer h.probing.Store(false)
		var perr error = ErrDown
		if h.probe != nil {
			if perr = h.probe(); perr == nil {
				close(verdict)
				return
			}
		}
		if h.down.CompareAndSwap(false, true) && h.onChange != nil {
			h.onChange(true, perr)
		}
		close(verdict)
		tick := time.NewTicker(probeEvery)
		defer tick.Stop()
		for h.down.Load() {
			select {
			case <-h.stop:
				return
			case <-tick.C:
			}
			if h.probe == nil || h.probe() == nil {
				h.answered()
			}
		}
	}()
}

// waitVerdict waits until the probe that runs, if any, has its first
// answer, or ctx is done: a call that failed then knows whether Redis is
// down or was only late for it.
func (h *health) waitVerdict(ctx context.Context) {
	h.mu.Lock()
	verdict := h.verdict
	h.mu.Unlock()
	if verdict == nil {
		return
	}
	select {
	case <-verdict:
	case <-ctx.Done():
	case <-h.stop:
	}
}

// errQueueFull is the error of a call made while its queue's share of
// maxQueued calls wait already, or its client's share of that: Redis is
// slow or gone, and waiting longer would not help.
var errQueueFull = errors.New("too many calls wait for redis")

// errWoke is the error of an admission to a concurrency limit that Redis
// decided as it woke from a long silence (see Redis.leaseGrace).
var errWoke = errors.New("decided as redis answered again after a long silence")

// errClosed is the error of a call made after Close.
var errClosed = errors.New("the redis limiter is closed")

// unsent reports whether err is the failure of a call that never reached
// Redis, which therefore cannot have run there.
func unsent(err error) bool {
	return errors.Is(err, errDownUnsent) || errors.Is(err, errQueueFull) || errors.Is(err, errClosed)
}

// call is one script run queued for the next pipeline.
type call struct {
	script *redis.Script
	keys   []string
	args   []any
	// done receives the command once its pipeline returned; nil for a
	// deferred settle, which nobody waits for.
	done chan *redis.Cmd
	ctx  context.Context // the waiting caller's: a call it gave up is not sent
	// later is the deferred settle's retry, should its pipeline fail.
	later retry
}

// callQueue is the calls waiting for a pipeline.
type callQueue struct {
	mu     sync.Mutex // protects the fields below
	calls  []*call
	spare  []*call          // the slice of the last pipeline, for the next queue
	queued map[string]int32 // calls in calls by their first key (a client's), none at 0
	closed bool
}

// batcher is one of the Redis limiter's queues, and the goroutine that
// drains it.
type batcher struct {
	queue  callQueue
	wake   chan struct{} // a call was queued
	urgent chan struct{} // a call that waits for its answer was queued
	stop   chan struct{}
	done   chan struct{}
}

func (b *batcher) init() {
	b.wake = make(chan struct{}, 1)
	b.urgent = make(chan struct{}, 1)
	b.stop = make(chan struct{})
	b.done = make(chan struct{})
}

// queueOf returns the queue of the client whose keys are keys.
func (r *Redis) queueOf(keys []string) *batcher {
	return &r.batches[maphash.String(r.queueSeed, keys[0])%queues]
}

// enqueue queues c for its queue's next pipeline.
func (r *Redis) enqueue(c *call) error {
	b := r.queueOf(c.keys)
	q := &b.queue
	q.mu.Lock()
	switch {
	case q.closed:
		q.mu.Unlock()
		return errClosed
	case len(q.calls) >= maxPerQueue, q.queued[c.keys[0]] >= maxPerClient:
		q.mu.Unlock()
		return errQueueFull
	}
	q.calls = append(q.calls, c)
	if q.queued == nil {
		q.queued = make(map[string]int32)
	}
	q.queued[c.keys[0]]++
	q.mu.Unlock()
	signal(b.wake)
	if c.done != nil {
		signal(b.urgent)
	}
	return nil
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// run queues a script run and waits for its answer, or for ctx. The
// answer is bounded by the timeout from when its pipeline is sent, not
// from when it was queued. While Redis is held for down it fails at once
// with ErrDown.
func (r *Redis) run(ctx context.Context, script *redis.Script, keys []string, args ...any) (*redis.Cmd, error) {
	if !r.health.pass() {
		return nil, errDownUnsent
	}
	c := &call{script: script, keys: keys, args: args, done: make(chan *redis.Cmd, 1), ctx: ctx}
	if err := r.enqueue(c); err != nil {
		return nil, err
	}
	select {
	case cmd := <-c.done:
		err := cmd.Err()
		if err != nil && !isAnswer(err) {
			// Its failure started a probe, or a late answer did: down,
			// or late for this call only?
			r.health.waitVerdict(ctx)
			if r.health.down.Load() {
				err = fmt.Errorf("%w: %w", ErrDown, err)
			}
		}
		return cmd, err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// flushLoop sends the calls of queue b, one pipeline at a time, until
// Close; then it sends what is left.
func (r *Redis) flushLoop(b *batcher) {
	defer close(b.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-b.stop:
			r.drain(b)
			return
		case <-b.wake:
		}
		// Deferred settles alone wait a little for company; a call that
		// waits for its answer, or Close, sends them at once.
		select {
		case <-b.urgent:
		default:
			timer.Reset(flushEvery)
			select {
			case <-b.urgent:
			case <-timer.C:
			case <-b.stop:
			}
			timer.Stop()
		}
		r.flush(b)
	}
}

// drain closes queue b and sends what it holds.
func (r *Redis) drain(b *batcher) {
	q := &b.queue
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	for r.flush(b) {
	}
}

// flush sends the queued calls, at most maxPipeline, in one pipeline and
// hands out the answers; what is left waits for the next. It reports
// whether there were any.
func (r *Redis) flush(b *batcher) bool {
	q := &b.queue
	q.mu.Lock()
	calls := q.calls
	if len(calls) > maxPipeline {
		// The rest, in order, in a slice of its own: calls is reused.
		q.calls = append(q.spare, calls[maxPipeline:]...)
		calls = calls[:maxPipeline]
		signal(b.wake)
		signal(b.urgent)
	} else {
		q.calls = q.spare
	}
	q.spare = nil
	for _, c := range calls {
		if n := q.queued[c.keys[0]] - 1; n > 0 {
			q.queued[c.keys[0]] = n
		} else {
			delete(q.queued, c.keys[0])
		}
	}
	q.mu.Unlock()
	if len(calls) > 0 {
		r.send(calls)
	}
	clear(calls)
	q.mu.Lock()
	q.spare = calls[:0]
	q.mu.Unlock()
	return len(calls) > 0
}

// send sends calls in one pipeline and hands out the answers. The calls
// whose callers gave up are not sent: their callers cancel them (see
// Admit). Redis' answer is timed from now, whatever the calls waited in
// their queue, so that no call's time counts the calls queued before it
// (a burst of its own client's); a waiting caller's own deadline bounds
// it too.
func (r *Redis) send(calls []*call) {
	deadline := time.Now().Add(r.wait())
	sent := make([]*call, 0, len(calls))
	for _, c := range calls {
		if c.ctx == nil {
			sent = append(sent, c)
			continue
		}
		if err := c.ctx.Err(); err != nil {
			cmd := redis.NewCmd(c.ctx)
			cmd.SetErr(err)
			c.done <- cmd
			continue
		}
		if d, ok := c.ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d // no waiting caller is left behind by its pipeline
		}
		sent = append(sent, c)
	}
	if len(sent) == 0 {
		return
	}
	cmds := r.pipeline(sent, deadline)
	for i, c := range sent {
		r.answer(c, cmds[i])
	}
}

// pipeline sends calls in one pipeline, by their scripts' SHA, and
// records whether Redis answered. The calls that Redis did not run for
// want of their script (a Redis restarted or flushed) are sent again, in
// order, with the scripts themselves (EVAL, which loads them), in a round
// trip of their own with a timeout of its own: loading the scripts costs
// a caller one more round trip, never its deadline.
func (r *Redis) pipeline(calls []*call, deadline time.Time) []*redis.Cmd {
	cmds := make([]*redis.Cmd, len(calls))
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	pipe := r.client.Pipeline()
	for i, c := range calls {
		cmds[i] = c.script.EvalSha(ctx, pipe, c.keys, c.args...)
	}
	late := time.AfterFunc(r.timeout, r.health.suspect)
	err := r.exec(ctx, pipe)
	late.Stop()
	var again []int
	for i, cmd := range cmds {
		if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
			again = append(again, i)
		}
	}
	if len(again) == 0 || err != nil && !redis.HasErrorPrefix(err, "NOSCRIPT") {
		return cmds
	}
	ctx, cancel = context.WithTimeout(context.Background(), r.wait())
	defer cancel()
	pipe = r.client.Pipeline()
	// Every script loads first, so that no later pipeline finds some
	// scripts and not others: those it finds would run before the others'
	// retries, out of order.
	for _, s := range requestScripts {
		pipe.ScriptLoad(ctx, s.src)
	}
	for _, i := range again {
		c := calls[i]
		cmds[i] = c.script.Eval(ctx, pipe, c.keys, c.args...)
	}
	r.exec(ctx, pipe)
	return cmds
}

// exec sends pipe and records whether Redis answered: an error of Redis'
// own (a refusal, NOSCRIPT) is an answer, a timeout or a broken
// connection is not. It returns the first error.
func (r *Redis) exec(ctx context.Context, pipe redis.Pipeliner) error {
	_, err := pipe.Exec(ctx) // each command has its own error
	if err == nil || isAnswer(err) {
		r.noteAnswer(time.Now())
		r.health.answered()
	} else {
		r.health.suspect()
	}
	return err
}

// wait is how long a round trip waits for Redis' answer: the timeout, or
// the probe's when longer, so that a late answer is still Redis' word
// unless a probe says Redis is down.
func (r *Redis) wait() time.Duration { return max(r.timeout, probeTimeout) }

// isAnswer reports whether err is Redis' own answer, not a failure to get
// one.
func isAnswer(err error) bool {
	var e redis.Error
	return errors.As(err, &e) && !redis.IsMaxClientsError(err) && !redis.IsLoadingError(err)
}

// answer hands cmd to the caller that waits for it. A deferred settle
// that failed is retried until it lands, unless Redis refused it.
func (r *Redis) answer(c *call, cmd *redis.Cmd) {
	if c.done != nil {
		c.done <- cmd
		return
	}
	err := cmd.Err()
	switch {
	case err == nil:
	case c.script == giveBackScript && (rediserr.Refused(err) || c.later.giveBack == nil):
		r.logger.Error("giving back a slice of the shared limits failed; it counts as used until the buckets refill, or a quota's until its period ends",
			zap.String("client_id", c.later.client), zap.Error(err))
	case c.script == giveBackScript: // a repeat changes nothing
		r.retryLater(c.later)
	case rediserr.Refused(err):
		r.logger.Error("the shared limiter refused a settle; it is given up",
			zap.String("client_id", c.later.client), zap.Int64("tokens", c.later.delta), zap.Error(err))
	case c.later.lease.ID != "": // without an ID, a repeat would charge again
		r.retryLater(c.later)
	default:
		r.logger.Error("settling in the shared limiter failed; the request's tokens are not corrected",
			zap.String("client_id", c.later.client), zap.Int64("tokens", c.later.delta), zap.Error(err))
	}
}
