package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// DefaultLockout is the longest the upstream's word alone stops the
// callers of a scope: past it, probes decide.
const DefaultLockout = time.Minute

// maxProbeEvery bounds how long one probe holds off the next when it
// gets no answer: a caller that left, a slow answer.
const maxProbeEvery = 10 * time.Second

// maxModelScopes bounds the models whose exhaustion an instance keeps:
// model names come from callers, and only those the upstream answered
// for with a spent count are kept.
const maxModelScopes = 256

// KeyScope names the scope of the server key as a whole in the fleet's
// store; a model's scope is named by ModelScope.
const KeyScope = "*"

// DownScope names, in the fleet's store, the word that the upstream
// refused the key (401/403): the key is out of every instance's pool
// until a probe passes.
const DownScope = "down"

// ModelScope names a model's scope in the fleet's store: a hash, so that
// no caller-chosen string becomes a part of a key name.
func ModelScope(model string) string { s := modelScope(model); return hex.EncodeToString(s[:]) }

func modelScope(model string) [8]byte {
	sum := sha256.Sum256([]byte(model))
	return [8]byte(sum[:8])
}

// Fingerprint names an upstream URL and server key in the fleet's store,
// the models cache and logs, in place of the key: a truncated SHA-256,
// from which the key cannot be recovered.
func Fingerprint(url, key string) string {
	sum := sha256.Sum256([]byte("vigthoria upstream\x00" + url + "\x00" + key))
	return hex.EncodeToString(sum[:8])
}

// ScopeWord is what the fleet knows of one scope's lockout.
type ScopeWord struct {
	// Scope is KeyScope or a ModelScope.
	Scope string
	// Until is when the lockout ends; Noted when it was last heard.
	Until, Noted time.Time
	// Probe says the upstream claimed more than the lockout bound: past
	// Until, one probe at a time learns whether it still refuses.
	Probe bool
}

// SharedExhaustion shares the upstream's word on one server key's
// exhaustion among the instances of a fleet. The implementation knows
// which key (by its Fingerprint); every time passed is in its scope.
type SharedExhaustion interface {
	// Publish raises a scope's lockout to what w says.
	Publish(ctx context.Context, w ScopeWord) error
	// Clear ends a scope's lockout, unless it was noted at or after
	// sent: the answer of a request sent after it was heard proved it
	// over.
	Clear(ctx context.Context, scope string, sent time.Time) error
	// Fetch returns every scope the fleet holds a lockout of.
	Fetch(ctx context.Context) ([]ScopeWord, error)
	// ClaimProbe reports whether this instance sends the fleet's next
	// probe of scope; no other may within every.
	ClaimProbe(ctx context.Context, scope string, every time.Duration) (bool, error)
}

// sharedEvery is how often an instance asks the fleet what the upstream
// said of the key.
const sharedEvery = time.Second

// sharedTimeout bounds one exchange with the fleet's store off the
// request path; claimTimeout bounds the one a probe makes on it.
const (
	sharedTimeout = time.Second
	claimTimeout  = 250 * time.Millisecond
)

// scope is the lockout of one scope: the server key, or one model. The
// zero value is open.
type scope struct {
	locked atomic.Bool // anything noted; false is the request path's fast way out

	mu      sync.Mutex // protects the fields below
	until   time.Time  // callers are refused before it
	noted   time.Time  // when the lockout was last heard
	probe   bool       // the claim went past until: probes decide after it
	probeAt time.Time  // when the last probe was let through
}

// check decides a request of the scope at now: refused for wait, or let
// through, as the probe when probe.
func (s *scope) check(now time.Time, probeEvery time.Duration) (wait time.Duration, refused, probe bool) {
	if !s.locked.Load() {
		return 0, false, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case !s.locked.Load():
		return 0, false, false
	case now.Before(s.until):
		return s.until.Sub(now), true, false
	case !s.probe:
		// The upstream's own time is over.
		s.reset()
		return 0, false, false
	case now.Sub(s.probeAt) < probeEvery:
		return s.probeAt.Add(probeEvery).Sub(now), true, false
	}
	s.probeAt = now
	return 0, false, true
}

// release gives back the probe claimed at at, unless another was claimed
// since: its request never reached the upstream.
func (s *scope) release(at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.probeAt.Equal(at) {
		s.probeAt = time.Time{}
	}
}

// ProbeClaim is the probe of a locked scope that a request was let
// through as (Upstream.Exhausted); the zero value claims none. Its
// request gives it back (Release) when it never reaches the upstream:
// refused by the proxy itself, or its caller gone, it would otherwise
// hold off the next probe, and every caller, for the probe's interval.
type ProbeClaim struct {
	s  [2]*scope // the key's, the model's; nil for none
	at time.Time
}

// Release gives the probe back. The fleet's claim on it (ClaimProbe)
// stays until its interval ends.
func (c ProbeClaim) Release() {
	for _, s := range c.s {
		if s != nil {
			s.release(c.at)
		}
	}
}

// note raises the lockout to w's, reporting whether it changed enough
// to tell: it started, its probing changed, or it grew by a second or
// more. Answers in a burst each push a relative reset a little later,
// and are not each worth a message to the fleet.
func (s *scope) note(w ScopeWord) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	switch {
	case w.Until.After(s.until):
		changed = !s.locked.Load() || w.Probe != s.probe || w.Until.Sub(s.until) >= time.Second
		s.until, s.probe = w.Until, w.Probe
	case w.Until.Equal(s.until) && w.Probe && !s.probe:
		s.probe, changed = true, true
	}
	if w.Noted.After(s.noted) {
		s.noted = w.Noted
	}
	s.locked.Store(true)
	return changed
}

// clear opens the scope at now for the 2xx answer of a request sent at
// sent, reporting whether it did: only past until, when probes decide,
// and only for a request sent after the lockout was last heard. Before
// until the lockout holds, whatever answers come: the requests of
// another instance that did not know yet, say.
func (s *scope) clear(sent, now time.Time) bool {
	if !s.locked.Load() {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.locked.Load() || now.Before(s.until) || !s.noted.Before(sent) {
		return false
	}
	s.reset()
	return true
}

// over reports whether the scope is open, or past its until and not
// probed: nothing left to remember.
func (s *scope) over(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.locked.Load() || (!s.probe && !now.Before(s.until))
}

// openIfPast opens the scope if it is past its until, probed or not,
// reporting whether it is open.
func (s *scope) openIfPast(now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.locked.Load() && !now.Before(s.until) {
		s.reset()
	}
	return !s.locked.Load()
}

// reset opens the scope; s.mu is held.
func (s *scope) reset() {
	s.until, s.noted, s.probeAt, s.probe = time.Time{}, time.Time{}, time.Time{}, false
	s.locked.Store(false)
}

// exhaustion remembers what the upstream said of the server key's limits,
// by scope: the key as a whole (the bare X-RateLimit-* counts, a 429
// naming the quota) and each model (OpenAI's per-model
// x-ratelimit-*-requests and -tokens), so that callers of a spent scope
// get a local 429 instead of another upstream call that would only
// prolong it, and callers of any other scope are served. No header locks
// a scope for longer than lockout: past it, one request at a time (a
// probe) is let through, and the scope is open again once a 2xx answer
// to a request sent after the lockout was heard says nothing is spent.
// With a shared store, what one instance hears reaches the others within
// about a second, and one probe at a time is sent for the fleet; the
// exchanges run off the request path but for a probe's claim. Make one
// with newExhaustion; it is safe for concurrent use.
type exhaustion struct {
	lockout    time.Duration
	probeEvery time.Duration // how long a probe without an answer holds off the next
	key        scope
	shared     SharedExhaustion // nil: this instance alone
	logger     *zap.Logger
	// spent, when set, is told when the key as a whole is newly locked.
	spent func(now time.Time)
	// fleetDown, when set, is told at each fetch whether the fleet holds
	// the key refused (DownScope).
	fleetDown func(down bool, now time.Time)

	fetched  atomic.Int64 // unix nanoseconds of the last fetch started
	fetching atomic.Bool
	nmodels  atomic.Int32 // len(models), read without the lock

	mu     sync.Mutex         // protects models
	models map[[8]byte]*scope // by modelScope, at most maxModelScopes
}

func newExhaustion(lockout time.Duration, shared SharedExhaustion, logger *zap.Logger) *exhaustion {
	if lockout <= 0 {
		lockout = DefaultLockout
	}
	return &exhaustion{lockout: lockout, probeEvery: min(lockout, maxProbeEvery), shared: shared, logger: logger}
}

// heard takes in the word of an answer with status to a request of model
// ("" for none) sent at sent: a spent scope is locked, and a 2xx answer
// without such word opens, past their until, the scopes it speaks for.
func (e *exhaustion) heard(w limitWord, model string, status int, sent, now time.Time) {
	ok := status >= 200 && status < 300
	if !w.keyUntil.IsZero() {
		e.lock("", w.keyUntil, now)
	} else if ok && e.key.clear(sent, now) {
		e.clearShared(KeyScope, sent)
	}
	if model == "" {
		return
	}
	if !w.modelUntil.IsZero() {
		e.lock(model, w.modelUntil, now)
	} else if ok && e.nmodels.Load() > 0 {
		id := modelScope(model)
		if s := e.model(id); s != nil && s.clear(sent, now) {
			e.dropModel(id, s)
			e.clearShared(hex.EncodeToString(id[:]), sent)
		}
	}
}

// lock locks the scope of model ("" for the key's) until the upstream's
// claim, at most lockout from now, and tells the log and the fleet.
func (e *exhaustion) lock(model string, claim, now time.Time) {
	until := now.Add(e.lockout)
	if claim.Before(until) {
		until = claim
	}
	if !until.After(now) {
		return // a reset already past: nothing to hold
	}
	w := ScopeWord{Scope: KeyScope, Until: until, Noted: now, Probe: claim.After(until)}
	var changed bool
	if model == "" {
		if changed = e.key.note(w); changed && e.spent != nil {
			e.spent(now)
		}
	} else {
		id := modelScope(model)
		w.Scope = hex.EncodeToString(id[:])
		changed = e.noteModel(id, w, now)
	}
	if !changed || until.Sub(now) < sharedEvery {
		// A lockout shorter than the fleet's look would end before the
		// others heard of it; an upstream near its limit may send one on
		// every answer, each not worth a log line.
		return
	}
	if c := e.logger.Check(zap.InfoLevel, "the upstream says the server key or a model is spent; its callers get upstream_rate_limited"); c != nil {
		c.Write(zap.String("model", model), zap.Time("until", until), zap.Time("upstream_said", claim), zap.Bool("probed_after", w.Probe))
	}
	if e.shared != nil {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
			defer cancel()
			if err := e.shared.Publish(ctx, w); err != nil {
				e.logger.Warn("sharing the upstream's exhaustion failed", zap.Error(err))
			}
		}()
	}
}

// clearShared tells the fleet that an answer proved a scope open.
func (e *exhaustion) clearShared(name string, sent time.Time) {
	if e.shared == nil {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
		defer cancel()
		if err := e.shared.Clear(ctx, name, sent); err != nil {
			e.logger.Warn("sharing the upstream's recovery failed", zap.Error(err))
		}
	}()
}

// model returns the scope of a model, nil for none.
func (e *exhaustion) model(id [8]byte) *scope {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.models[id]
}

// noteModel notes w in the scope of a model, made when absent, reporting
// whether it changed (see scope.note). It is made and noted under e.mu,
// so that dropModel never takes it for open in between. When full,
// scopes that are over go first, then the one that ends first.
func (e *exhaustion) noteModel(id [8]byte, w ScopeWord, now time.Time) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if s, ok := e.models[id]; ok {
		return s.note(w)
	}
	if e.models == nil {
		e.models = make(map[[8]byte]*scope)
	}
	if len(e.models) >= maxModelScopes {
		var first [8]byte
		var firstUntil time.Time
		for k, s := range e.models {
			if s.over(now) {
				delete(e.models, k)
				continue
			}
			s.mu.Lock()
			if firstUntil.IsZero() || s.until.Before(firstUntil) {
				first, firstUntil = k, s.until
			}
			s.mu.Unlock()
		}
		if len(e.models) >= maxModelScopes {
			delete(e.models, first)
		}
	}
	s := new(scope)
	e.models[id] = s
	e.nmodels.Store(int32(len(e.models)))
	return s.note(w)
}

// dropModel forgets a model's scope, if it is still s and open.
func (e *exhaustion) dropModel(id [8]byte, s *scope) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.models[id] == s && !s.locked.Load() {
		delete(e.models, id)
		e.nmodels.Store(int32(len(e.models)))
	}
}

// check decides whether a request may go upstream at now: of the key
// when model is "", else of that model. A request refused waits wait. A
// request let through as a scope's probe first claims the fleet's probe;
// refused that, it waits for the next. claim is the probe it was let
// through as.
func (e *exhaustion) check(ctx context.Context, model string, now time.Time) (wait time.Duration, refused bool, claim ProbeClaim) {
	e.fetch(now)
	s := &e.key
	var id [8]byte
	if model != "" {
		if e.nmodels.Load() == 0 {
			return 0, false, claim
		}
		id = modelScope(model)
		if s = e.model(id); s == nil {
			return 0, false, claim
		}
	}
	wait, refused, probe := s.check(now, e.probeEvery)
	if model != "" && !s.locked.Load() {
		e.dropModel(id, s) // open again
	}
	if probe {
		claim = ProbeClaim{[2]*scope{s}, now}
	}
	if !probe || e.shared == nil {
		return wait, refused, claim
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), claimTimeout)
	defer cancel()
	name := KeyScope
	if model != "" {
		name = hex.EncodeToString(id[:])
	}
	ours, err := e.shared.ClaimProbe(ctx, name, e.probeEvery)
	if err != nil {
		// The store is down: probe from here, at most one an interval.
		return 0, false, claim
	}
	if !ours {
		return e.probeEvery, true, ProbeClaim{}
	}
	return 0, false, claim
}

// fetch starts, at most once a second, a look at what the other
// instances heard; its answer counts from the next request on.
func (e *exhaustion) fetch(now time.Time) {
	if e.shared == nil || now.UnixNano()-e.fetched.Load() < int64(sharedEvery) || !e.fetching.CompareAndSwap(false, true) {
		return
	}
	e.fetched.Store(now.UnixNano())
	go func() {
		defer e.fetching.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
		defer cancel()
		words, err := e.shared.Fetch(ctx)
		if err != nil {
			return
		}
		e.adopt(words, time.Now())
	}()
}

// adopt takes in the fleet's lockouts at now. A scope here that is past
// its until and that the fleet no longer holds was proved open
// elsewhere, or has expired there: it opens here too.
func (e *exhaustion) adopt(words []ScopeWord, now time.Time) {
	held := make(map[string]bool, len(words))
	for _, w := range words {
		if w.Scope == DownScope {
			held[DownScope] = true
			continue
		}
		if w.Until.After(now.Add(e.lockout)) {
			w.Until = now.Add(e.lockout) // no lockout past the bound, whoever wrote it
			w.Probe = true
		}
		held[w.Scope] = true
		if w.Scope == KeyScope {
			e.key.note(w)
			continue
		}
		raw, err := hex.DecodeString(w.Scope)
		if err != nil || len(raw) != 8 {
			continue
		}
		e.noteModel([8]byte(raw), w, now)
	}
	if !held[KeyScope] {
		e.key.openIfPast(now)
	}
	if e.fleetDown != nil {
		e.fleetDown(held[DownScope], now)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for id, s := range e.models {
		if !held[hex.EncodeToString(id[:])] && s.openIfPast(now) {
			delete(e.models, id)
		}
	}
	e.nmodels.Store(int32(len(e.models)))
}

// peek reports, without claiming a probe, whether the scope refuses a
// request at now, and for how long.
func (s *scope) peek(now time.Time, probeEvery time.Duration) (time.Duration, bool) {
	if !s.locked.Load() {
		return 0, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case !s.locked.Load():
		return 0, false
	case now.Before(s.until):
		return s.until.Sub(now), true
	case s.probe && now.Sub(s.probeAt) < probeEvery:
		return s.probeAt.Add(probeEvery).Sub(now), true
	}
	return 0, false
}

// peek reports, without claiming a probe or asking the fleet, whether a
// request of model ("" for none) may not go upstream at now: the key's
// scope, then the model's.
func (e *exhaustion) peek(model string, now time.Time) (time.Duration, bool) {
	if wait, spent := e.key.peek(now, e.probeEvery); spent {
		return wait, true
	}
	if model == "" || e.nmodels.Load() == 0 {
		return 0, false
	}
	if s := e.model(modelScope(model)); s != nil {
		return s.peek(now, e.probeEvery)
	}
	return 0, false
}
