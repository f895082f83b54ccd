package limiter

import (
	"context"
	"errors"
	"hash/maphash"
	"sync"
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
// with errQueueFull (a Fallback then decides without Redis), and a
// deferred settle goes to the retries.
const maxQueued = 10_000

// maxPerQueue is a queue's share of maxQueued.
const maxPerQueue = maxQueued / queues

// flushEvery is how long a pipeline holding only deferred settles waits
// for company; a call that waits for its answer sends it at once.
const flushEvery = 2 * time.Millisecond

// errQueueFull is the error of a call made while maxQueued calls wait
// already: Redis is slow or gone, and waiting longer would not help.
var errQueueFull = errors.New("too many calls wait for redis")

// errClosed is the error of a call made after Close.
var errClosed = errors.New("the redis limiter is closed")

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
	spare  []*call // the slice of the last pipeline, for the next queue
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
	case len(q.calls) >= maxPerQueue:
		q.mu.Unlock()
		return errQueueFull
	}
	q.calls = append(q.calls, c)
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

// run queues a script run and waits for its answer, or for ctx.
func (r *Redis) run(ctx context.Context, script *redis.Script, keys []string, args ...any) (*redis.Cmd, error) {
	c := &call{script: script, keys: keys, args: args, done: make(chan *redis.Cmd, 1), ctx: ctx}
	if err := r.enqueue(c); err != nil {
		return nil, err
	}
	select {
	case cmd := <-c.done:
		return cmd, cmd.Err()
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

// flush sends the queued calls in one pipeline and hands out the
// answers. It reports whether there were any.
func (r *Redis) flush(b *batcher) bool {
	q := &b.queue
	q.mu.Lock()
	calls := q.calls
	q.calls, q.spare = q.spare, nil
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
// Admit). The pipeline waits no longer than the first of the waiting
// callers would, and at most a third of the lease TTL (for deferred
// settles alone); the client's own timeouts bound it too.
func (r *Redis) send(calls []*call) {
	deadline := time.Now().Add(min(r.leaseTTL/3, 5*time.Second))
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
			deadline = d
		}
		sent = append(sent, c)
	}
	if len(sent) == 0 {
		return
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	cmds := r.pipeline(ctx, sent)
	for i, c := range sent {
		r.answer(c, cmds[i])
	}
}

// pipeline sends calls in one pipeline, by their scripts' SHA. The calls
// that Redis did not run for want of their script (a Redis restarted or
// flushed) are sent again, in order, once the scripts are loaded.
func (r *Redis) pipeline(ctx context.Context, calls []*call) []*redis.Cmd {
	cmds := make([]*redis.Cmd, len(calls))
	pipe := r.client.Pipeline()
	for i, c := range calls {
		cmds[i] = c.script.EvalSha(ctx, pipe, c.keys, c.args...)
	}
	pipe.Exec(ctx) // each command has its own error
	var again []int
	for i, cmd := range cmds {
		if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
			again = append(again, i)
		}
	}
	if len(again) == 0 {
		return cmds
	}
	for _, s := range []*redis.Script{admitScript, reserveScript, settleScript, stateScript, giveBackScript} {
		if err := s.Load(ctx, r.client).Err(); err != nil {
			return cmds // each keeps its NOSCRIPT, a failure like any other
		}
	}
	pipe = r.client.Pipeline()
	for _, i := range again {
		c := calls[i]
		cmds[i] = c.script.EvalSha(ctx, pipe, c.keys, c.args...)
	}
	pipe.Exec(ctx)
	return cmds
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
	case c.script == giveBackScript:
		r.logger.Error("giving back a slice of the shared limits failed; it counts as used until the buckets refill",
			zap.String("client_id", c.later.client), zap.Error(err))
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
