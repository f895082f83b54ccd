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

// DefaultDetachedPerCaller is one caller's share of max detached calls:
// a sixteenth, at least one. A caller rarely leaves more than a few
// calls at once (a closed tab, a cancelled batch), and sixteen callers
// must then leave their whole share at once before another finds none.
func DefaultDetachedPerCaller(maxDetached int) int { return max(1, maxDetached/16) }

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
// all, whatever site or config started them; and each caller's, so that
// no caller takes them all from the others.
var (
	detachedNow     atomic.Int64
	detachedRefused atomic.Int64 // for want of a free call of the process
	detachedBy      = NewCallers()
)

// Detached returns the calls running detached now, and how many callers
// left while max_detached were running: their calls were cut at once.
func Detached() (now, refused int64) { return detachedNow.Load(), detachedRefused.Load() }

// DetachPolicy says what happens to an upstream call when its caller
// leaves after the request was sent: it goes on to its end (detached),
// while fewer than Max calls of the process and fewer than PerCaller of
// its caller's are detached, for at most Timeout; else it is cut at once.
// Either way the request is settled only when the call is over, and its
// charge follows what the upstream reported, or a bound of what it may
// bill when it reported nothing.
type DetachPolicy struct {
	Max       int64         // 0: never detach
	PerCaller int64         // of one caller's (Call.Caller); 0: Max only
	Timeout   time.Duration // from the caller's leaving
	// cut ends every call this policy detached: its config is going.
	cut context.Context
}

// acquire takes a detached call for caller, if the process and the
// caller have one free. A caller's count has an entry only while it has
// a call detached, so they are bounded by Max, not by the callers.
func (p *DetachPolicy) acquire(caller string) bool {
	if detachedNow.Add(1) > p.Max {
		detachedNow.Add(-1)
		detachedRefused.Add(1)
		return false
	}
	if p.PerCaller > 0 && !detachedBy.add(caller, 1, p.PerCaller) {
		// Its own share is taken: its call is cut, others keep theirs.
		detachedNow.Add(-1)
		return false
	}
	return true
}

// release gives back a detached call that acquire took for caller.
func (p *DetachPolicy) release(caller string) {
	if p.PerCaller > 0 {
		detachedBy.add(caller, -1, 0)
	}
	detachedNow.Add(-1)
}

// The states of a call's watch on its caller.
const (
	watching = iota // the caller is there
	detached        // the caller left; the call goes on
	cutShort        // the caller left; the call was cut
	over            // the call ended
)

// watch is a call's watch on its caller, which decides whether the
// upstream request ends with it, and the context of that request: the
// caller's values (and the call's trace) without its cancellation, done
// when the watch ends it. It is its call's, so a call allocates no
// context of its own. It implements AfterFunc, so that the transport's
// context under it is ended through it, without a goroutine.
type watch struct {
	caller context.Context // its values; never its cancellation
	trace  context.Context // the call's client trace, looked up first
	policy *DetachPolicy

	mu      sync.Mutex    // protects the fields below
	state   uint8         // packed with ended: a Call stays in its 704-byte size class
	ended   bool          // the request was ended
	cause   error         // why, if not as the call ended
	done    chan struct{} // made by Done
	after   func()        // run once it ends (AfterFunc)
	more    []*func()     // and these, past the first
	stop    func() bool   // stops watching the caller's context
	timer   *time.Timer   // detached_timeout, once detached
	stopCut func() bool   // stops watching policy.cut, once detached
}

// closedDone is the Done of a watch asked for it once it had ended.
var closedDone = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

func (*watch) Deadline() (time.Time, bool) { return time.Time{}, false }

func (w *watch) Done() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done == nil {
		w.done = make(chan struct{})
		if w.ended {
			w.done = closedDone
		}
	}
	return w.done
}

func (w *watch) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ended {
		return context.Canceled
	}
	return nil
}

// Value looks the call's trace up first, then the caller's values. As its
// cause, context.Cause reads the caller's: the transport's errors are
// given the watch's by causeOf, and an idle body keeps its own.
func (w *watch) Value(key any) any {
	if v := w.trace.Value(key); v != nil {
		return v
	}
	return w.caller.Value(key)
}

// AfterFunc runs f once the watch ends the request, as context.AfterFunc
// would; the context package calls it for a context made under the watch
// (the transport's, once per call), so the first f takes no slice.
func (w *watch) AfterFunc(f func()) (stop func() bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ended {
		go f()
		return func() bool { return false }
	}
	slot := &w.after
	if w.after != nil {
		slot = new(func())
		w.more = append(w.more, slot)
	}
	*slot = f
	return func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		stopped := *slot != nil
		*slot = nil
		return stopped
	}
}

// end ends the upstream request for cause, once.
func (w *watch) end(cause error) {
	w.mu.Lock()
	after := w.endLocked(cause)
	w.mu.Unlock()
	after.run()
}

// endLocked marks the request ended and returns what is to run once w.mu
// is unlocked: the functions of AfterFunc, which may read w.
func (w *watch) endLocked(cause error) afterFuncs {
	if w.ended {
		return afterFuncs{}
	}
	w.ended, w.cause = true, cause
	if w.done != nil {
		close(w.done)
	}
	after := afterFuncs{first: w.after}
	for _, f := range w.more {
		if *f != nil {
			after.more = append(after.more, *f)
		}
	}
	w.after, w.more = nil, nil
	return after
}

type afterFuncs struct {
	first func()
	more  []func()
}

func (a afterFuncs) run() {
	if a.first != nil {
		a.first()
	}
	for _, f := range a.more {
		f()
	}
}

// causeOf is err, an error of the upstream request, or why the watch
// ended it when err says only that it was cancelled: context.Cause of the
// request's context is not the watch's.
func (w *watch) causeOf(err error) error {
	if !errors.Is(err, context.Canceled) {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cause != nil {
		return w.cause
	}
	return err
}

// upstreamContext returns the context of c's upstream request: the
// caller's values and the trace, without the caller's cancellation, ended
// by the watch instead. The transport calls it once per call: its retries
// are its own, and the reverse proxy it serves makes no attempts of its
// own.
func (c *Call) upstreamContext(caller, trace context.Context, p *DetachPolicy) context.Context {
	w := &c.watch
	w.caller, w.trace, w.policy = caller, trace, p
	w.mu.Lock()
	w.stop = context.AfterFunc(caller, c.callerLeft)
	w.mu.Unlock()
	return w
}

// callerLeft decides the call's fate when its caller leaves: a request
// the upstream has not received yet is cut (it bills nothing); one it
// received goes on, detached, if the policy has room, and is cut if not.
func (c *Call) callerLeft() {
	w := &c.watch
	w.mu.Lock()
	after := c.decide(errCallerLeft)
	w.mu.Unlock()
	after.run()
}

// decide is callerLeft's decision, under w.mu: the call is cut for
// cause, unless it was sent and may go on detached.
func (c *Call) decide(cause error) afterFuncs {
	w := &c.watch
	if w.state != watching {
		return afterFuncs{}
	}
	if !c.Usage.Sent() || !w.policy.acquire(c.Caller) {
		w.state = cutShort
		c.Usage.mark(cutFlag)
		return w.endLocked(cause)
	}
	w.state = detached
	w.timer = time.AfterFunc(w.policy.Timeout, func() { c.cut(errDetachedTimeout) })
	if w.policy.cut != nil {
		w.stopCut = context.AfterFunc(w.policy.cut, func() { c.cut(errDetachedCut) })
	}
	return afterFuncs{}
}

// cut ends a detached call for cause, before its end.
func (c *Call) cut(cause error) {
	c.Usage.mark(cutFlag)
	c.watch.end(cause)
}

// finish ends the watch once the upstream call is over, its body read and
// closed: a detached call gives its place back. It runs once per call,
// on every way out of Forward.
func (c *Call) finish() {
	w := &c.watch
	if w.caller == nil {
		return
	}
	w.mu.Lock()
	if w.stop != nil {
		w.stop()
	}
	if w.state == detached {
		w.policy.release(c.Caller)
		w.timer.Stop()
		if w.stopCut != nil {
			w.stopCut()
		}
	}
	w.state = over
	after := w.endLocked(nil)
	w.mu.Unlock()
	after.run()
}

// CutDetached ends every call that up detached, now: its config is being
// cleaned up. Each is then settled with the bound of what it may bill.
func (up *Upstream) CutDetached() {
	if up.cutDetached != nil {
		up.cutDetached()
	}
}
