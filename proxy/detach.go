package proxy

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of the detached calls.
const (
	DefaultMaxDetached     = 256
	DefaultDetachedTimeout = 10 * time.Minute
)

// The causes that end a call's upstream request early.
var (
	// errCallerLeft: the caller left before its request reached the
	// upstream, or no detached call was free.
	errCallerLeft = errors.New("the caller left")
	// errDetachedTimeout: a detached call outlived detached_timeout.
	errDetachedTimeout = errors.New("the upstream call outlived detached_timeout after its caller left")
	// errDetachedCut: the config that started the call was cleaned up.
	errDetachedCut = errors.New("the upstream call was cut at shutdown after its caller left")
)

// Detached calls over the whole process: each is an upstream request and
// the goroutine of a request whose caller left, so one number bounds them
// all, whatever site or config started them.
var (
	detachedNow     atomic.Int64
	detachedRefused atomic.Int64
)

// Detached returns the calls running detached now, and how many callers
// left while max_detached were running: their calls were cut at once.
func Detached() (now, refused int64) { return detachedNow.Load(), detachedRefused.Load() }

// DetachPolicy says what happens to an upstream call when its caller
// leaves after the request was sent: it goes on to its end (detached),
// while fewer than Max calls of the process are detached, for at most
// Timeout; else it is cut at once. Either way the request is settled only
// when the call is over, and its charge follows what the upstream
// reported, or a bound of what it may bill when it reported nothing.
type DetachPolicy struct {
	Max     int64         // 0: never detach
	Timeout time.Duration // from the caller's leaving
	// cut ends every call this policy detached: its config is going.
	cut context.Context
}

func (p *DetachPolicy) acquire() bool {
	if detachedNow.Add(1) <= p.Max {
		return true
	}
	detachedNow.Add(-1)
	detachedRefused.Add(1)
	return false
}

// The states of a call's watch on its caller.
const (
	watching = iota // the caller is there
	detached        // the caller left; the call goes on
	cutShort        // the caller left; the call was cut
	over            // the call ended
)

// watch is a call's watch on its caller, which decides whether the
// upstream request ends with it.
type watch struct {
	policy *DetachPolicy
	cancel context.CancelCauseFunc // ends the upstream request

	mu      sync.Mutex // protects the fields below
	state   int
	stop    func() bool // stops watching the caller's context
	timer   *time.Timer // detached_timeout, once detached
	stopCut func() bool // stops watching policy.cut, once detached
}

// upstreamContext returns the context of c's upstream request: the
// caller's values without its cancellation, ended by the watch instead.
// The transport calls it once per call: its retries are its own, and the
// reverse proxy it serves makes no attempts of its own.
func (c *Call) upstreamContext(caller context.Context, p *DetachPolicy) context.Context {
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(caller))
	w := &c.watch
	w.policy, w.cancel = p, cancel
	w.mu.Lock()
	w.stop = context.AfterFunc(caller, c.callerLeft)
	w.mu.Unlock()
	return ctx
}

// callerLeft decides the call's fate when its caller leaves: a request
// the upstream has not received yet is cut (it bills nothing); one it
// received goes on, detached, if the policy has room, and is cut if not.
func (c *Call) callerLeft() {
	w := &c.watch
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.state != watching {
		return
	}
	if !c.Usage.Sent() || !w.policy.acquire() {
		w.state = cutShort
		w.cancel(errCallerLeft)
		return
	}
	w.state = detached
	w.timer = time.AfterFunc(w.policy.Timeout, func() { w.cancel(errDetachedTimeout) })
	if w.policy.cut != nil {
		w.stopCut = context.AfterFunc(w.policy.cut, func() { w.cancel(errDetachedCut) })
	}
}

// finish ends the watch once the upstream call is over, its body read and
// closed: a detached call gives its place back. It runs once per call,
// on every way out of Forward.
func (c *Call) finish() {
	w := &c.watch
	if w.cancel == nil {
		return
	}
	w.mu.Lock()
	if w.stop != nil {
		w.stop()
	}
	if w.state == detached {
		detachedNow.Add(-1)
		w.timer.Stop()
		if w.stopCut != nil {
			w.stopCut()
		}
	}
	w.state = over
	w.mu.Unlock()
	w.cancel(nil)
}

// CutDetached ends every call that up detached, now: its config is being
// cleaned up. Each is then settled with the bound of what it may bill.
func (up *Upstream) CutDetached() {
	if up.cutDetached != nil {
		up.cutDetached()
	}
}
