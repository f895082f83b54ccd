package limiter

import (
	"context"
	"errors"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/internal/rediserr"
)

// LeaseTTL is how long a lease of the Redis limiter lives unless renewed.
// Every instance renews the leases of its running requests three times a
// LeaseTTL, so a request holds its concurrency slot however long it runs,
// and the slots of an instance that died (or lost Redis for longer) are
// free again within LeaseTTL.
const LeaseTTL = 15 * time.Second

// keepEnded is how long Redis notes a lease that ended, so that a settle
// retried within it changes nothing (redis_lib.lua). A settle whose first
// attempt is older than that may find the note gone: it then charges but
// never refunds.
const keepEnded = time.Minute

// maxRetries bounds the calls waiting to be retried: past it the oldest
// are given up, and logged. A slot given up frees itself within LeaseTTL.
const maxRetries = 100_000

// retryBatch is how many calls one round of retries sends, in one
// pipeline.
const retryBatch = 1000

// leaseBook is the leases of the requests that run on this instance, by
// ID, with their client: what the renewals extend.
type leaseBook struct {
	seed   maphash.Seed
	shards [16]struct {
		mu sync.Mutex
		m  map[string]string // lease ID → client
	}
}

func (b *leaseBook) init() {
	b.seed = maphash.MakeSeed()
	for i := range b.shards {
		b.shards[i].m = make(map[string]string)
	}
}

func (b *leaseBook) add(id, client string) {
	s := &b.shards[maphash.String(b.seed, id)%uint64(len(b.shards))]
	s.mu.Lock()
	s.m[id] = client
	s.mu.Unlock()
}

func (b *leaseBook) remove(id string) {
	s := &b.shards[maphash.String(b.seed, id)%uint64(len(b.shards))]
	s.mu.Lock()
	delete(s.m, id)
	s.mu.Unlock()
}

// byClient returns the running leases' IDs, grouped by client.
func (b *leaseBook) byClient() map[string][]string {
	out := make(map[string][]string)
	for i := range b.shards {
		s := &b.shards[i]
		s.mu.Lock()
		for id, client := range s.m {
			out[client] = append(out[client], id)
		}
		s.mu.Unlock()
	}
	return out
}

// retry is a call to Redis that failed, retried until it lands: the
// settle of a lease, or the cancellation of an admission.
type retry struct {
	client   string
	lim      *Limits
	cancel   bool
	lease    Lease
	delta    int64  // used - reserved
	requests int64  // requests to charge (Charge)
	giveBack *slice // a slice's give-back, not a settle
	first    time.Time
}

// retryQueue is the calls waiting for a retry, oldest first.
type retryQueue struct {
	mu      sync.Mutex // protects the fields below
	calls   []retry
	dropped int // given up since last logged
}

func (r *Redis) settleLater(client string, lim *Limits, lease Lease, delta int64) {
	r.retryLater(retry{client: client, lim: lim, lease: lease, delta: delta, first: time.Now()})
}

func (r *Redis) cancelLater(client string, lim *Limits, id string) {
	r.retryLater(retry{client: client, lim: lim, cancel: true, lease: Lease{ID: id}, first: time.Now()})
}

func (r *Redis) retryLater(c retry) {
	q := &r.retries
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.calls) >= maxRetries {
		q.calls = q.calls[1:]
		q.dropped++
	}
	q.calls = append(q.calls, c)
}

// maintain renews the running leases and retries failed calls, until
// Close.
func (r *Redis) maintain() {
	defer close(r.stopped)
	renewEvery := r.leaseTTL / 3
	tick := time.NewTicker(min(renewEvery, time.Second))
	defer tick.Stop()
	var renewed time.Time
	failing := false // the renewals; logged when it changes
	for {
		select {
		case <-r.stop:
			return
		case now := <-tick.C:
			if r.slicing.Load() {
				r.giveBackStale(now)
			}
			r.retryPending(renewEvery)
			if now.Sub(renewed) < renewEvery {
				continue
			}
			err := r.renew(renewEvery)
			switch {
			case err == nil:
				renewed = now
				if failing {
					r.logger.Info("the leases of running requests are renewed again")
				}
			case !failing:
				r.logger.Warn("renewing the leases of running requests failed; they expire unless a renewal lands within the lease TTL, and are put back by the next one that does",
					zap.Duration("lease_ttl", r.leaseTTL), zap.Error(err))
			}
			failing = err != nil
		}
	}
}

// renew extends the running leases, one script per client in one
// pipeline.
func (r *Redis) renew(timeout time.Duration) error {
	leases := r.running.byClient()
	if len(leases) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := renewScript.Load(ctx, r.client).Err(); err != nil {
		return err
	}
	pipe := r.client.Pipeline()
	ttl := r.leaseTTL.Milliseconds()
	for client, ids := range leases {
		args := make([]any, 0, len(ids)+1)
		args = append(args, ttl)
		for _, id := range ids {
			args = append(args, id)
		}
		keys := r.keys(client)
		renewScript.EvalSha(ctx, pipe, []string{keys[1], keys[3]}, args...)
	}
	_, err := pipe.Exec(ctx)
	if err == nil {
		r.noteAnswer(time.Now())
	}
	return err
}

// silenceBook is what an instance knows of Redis' silences: when it last
// answered, and the last silence long enough for a lease renewed before
// it to expire, and when that ended. A Redis that stalls (a long fork, a
// slow script, DEBUG SLEEP) is silent for every instance at once, and its
// clock moves on meanwhile: the leases of requests that still run expire,
// since no instance could renew them, and an admission decided as Redis
// wakes, before their instances renew them, would take their slots.
type silenceBook struct {
	answered atomic.Int64 // unix ns; 0 before the first answer
	last     atomic.Int64 // the last long silence, ns
	ended    atomic.Int64 // unix ns: when it ended
}

// noteAnswer records that Redis answered the instance at now.
func (r *Redis) noteAnswer(now time.Time) {
	b := &r.silence
	t := now.UnixNano()
	if before := b.answered.Swap(t); before != 0 && t-before > int64(r.longSilence()) {
		b.last.Store(t - before) // before ended, which a reader loads first
		b.ended.Store(t)
	}
}

// longSilence is a silence long enough for a lease renewed just before it
// to expire: a lease renewed every third of its TTL has two thirds left.
func (r *Redis) longSilence() time.Duration { return r.leaseTTL - r.leaseTTL/3 }

// leaseGrace is how long before now a lease may have expired and still
// be counted live by an admission sent at now: none, unless Redis has
// been silent for this instance long enough for a running request's
// lease to expire unrenewed, or was until lately. Then the leases that
// expired during the silence count, until their instances have renewed
// them (a renewal period and a second after it ended); so do the slots
// of an instance that died meanwhile, a little longer than LeaseTTL. An
// instance cut off alone sees the same silence, and counts the others'
// leases for a while after it: that refuses more, never less.
func (r *Redis) leaseGrace(now time.Time) time.Duration {
	b := &r.silence
	answered := b.answered.Load()
	if answered == 0 {
		return 0
	}
	t := now.UnixNano()
	var grace time.Duration
	if ended := b.ended.Load(); ended != 0 && t-ended < int64(r.leaseTTL/3+time.Second) {
		grace = time.Duration(b.last.Load())
	}
	if silent := time.Duration(t - answered); silent > r.longSilence() {
		grace = max(grace, silent)
	}
	if grace == 0 {
		return 0
	}
	return grace + time.Second // the answers before the silence were up to a heartbeat apart
}

// wokeSince reports whether a long silence of Redis ended after sent: a
// call sent before it ended was decided as Redis woke, by its clock, which
// had moved past the leases no instance could renew.
func (r *Redis) wokeSince(sent time.Time) bool {
	return r.silence.ended.Load() >= sent.UnixNano()
}

// retryPending retries a batch of the failed calls in one pipeline, and
// puts back those that failed again.
func (r *Redis) retryPending(timeout time.Duration) {
	q := &r.retries
	q.mu.Lock()
	n := min(len(q.calls), retryBatch)
	batch := q.calls[:n:n]
	q.calls = q.calls[n:]
	dropped := q.dropped
	q.dropped = 0
	q.mu.Unlock()
	if dropped > 0 {
		r.logger.Error("gave up settling requests in the shared limiter: too many failed; their slots free themselves within the lease TTL, their tokens stay reserved",
			zap.Int("requests", dropped), zap.Duration("lease_ttl", r.leaseTTL))
	}
	if n == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// A give-back past keepEnded may repeat one that landed, whose note
	// is gone: it is given up, as a repeat would give twice.
	kept := batch[:0]
	for _, c := range batch {
		if c.giveBack != nil && r.unsure(c.first) {
			r.logger.Error("gave up giving back a slice of the shared limits after failures; it counts as used until the buckets refill, or a quota's until its period ends",
				zap.String("client_id", c.client), zap.Int64("requests", c.giveBack.requests), zap.Int64("tokens", c.giveBack.tokens))
			continue
		}
		kept = append(kept, c)
	}
	batch = kept
	failed, landed := batch[:0:0], 0
	if err := errors.Join(settleScript.Load(ctx, r.client).Err(), cancelScript.Load(ctx, r.client).Err(), giveBackScript.Load(ctx, r.client).Err()); err != nil {
		failed = batch
	} else {
		pipe := r.client.Pipeline()
		cmds := make([]*redis.Cmd, len(batch))
		for i, c := range batch {
			cmds[i] = r.retried(ctx, pipe, &c)
		}
		pipe.Exec(ctx) // each command has its own error
		for i, cmd := range cmds {
			switch err := cmd.Err(); {
			case err == nil:
				landed++
			case rediserr.Refused(err):
				// Redis ran it and said no: a retry would say no again.
				r.logger.Error("the shared limiter refused a settle or cancellation; it is given up",
					zap.String("client_id", batch[i].client), zap.Bool("cancel", batch[i].cancel),
					zap.Int64("tokens", batch[i].delta), zap.Error(err))
			default:
				failed = append(failed, batch[i])
			}
		}
	}
	if landed > 0 {
		r.logger.Info("settled or cancelled requests in the shared limiter after a failure", zap.Int("requests", landed))
	}
	if len(failed) == 0 {
		return
	}
	q.mu.Lock()
	q.calls = append(failed, q.calls...)
	q.mu.Unlock()
}

// retried queues a retry of c on pipe, by its script's SHA, which the
// caller loaded.
func (r *Redis) retried(ctx context.Context, pipe redis.Pipeliner, c *retry) *redis.Cmd {
	if c.giveBack != nil {
		return giveBackScript.EvalSha(ctx, pipe, r.keys(c.client), r.giveBackArgs(c.giveBack)...)
	}
	if c.cancel {
		args := limitArgs(make([]any, 0, 11), c.lim)
		args = append(args, c.lease.ID, r.keepEnded.Milliseconds())
		return cancelScript.EvalSha(ctx, pipe, r.keys(c.client), args...)
	}
	return settleScript.EvalSha(ctx, pipe, r.keys(c.client), r.settleArgs(c.lim, c.lease, c.delta, c.requests, r.unsure(c.first))...)
}

// unsure reports whether the note of a call's first attempt, made at
// first, may be gone from Redis, should that attempt have landed.
func (r *Redis) unsure(first time.Time) bool { return time.Since(first) > r.keepEnded-r.leaseTTL/3 }

// Close sends the calls still queued (the deferred settles), stops the
// renewals and retries, and retries the failed calls once more. The
// leases of requests still running expire within LeaseTTL. Calls made
// after Close fail, but for deferred settles, which are tried once.
func (r *Redis) Close() {
	r.closeOnce.Do(func() {
		r.giveBackAll()
		for i := range r.batches {
			close(r.batches[i].stop)
		}
		for i := range r.batches {
			<-r.batches[i].done
		}
		close(r.stop)
		<-r.stopped
		<-r.beaten
		r.leave()
		r.retryPending(time.Second)
		if n := r.retries.len(); n > 0 {
			r.logger.Error("closing with requests not settled in the shared limiter; their slots free themselves within the lease TTL, their tokens stay reserved",
				zap.Int("requests", n), zap.Duration("lease_ttl", r.leaseTTL))
		}
	})
}

func (q *retryQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.calls)
}
