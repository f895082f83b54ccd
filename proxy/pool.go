package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// ServerKey is one server key of the pool.
type ServerKey struct {
	// Key is the resolved key, sent as "Authorization: Bearer …".
	Key string
	// Name names the key in metrics, logs and events; its Fingerprint
	// when empty.
	Name string
	// Weight is the key's share of the requests when no key's standing
	// is known; 1 when zero.
	Weight int
	// Models are the globs of the models the key serves (MatchModel's
	// syntax); every model when empty.
	Models []string
}

// KeyState is told when a key of the pool is taken out (up false, with
// the upstream's status) or returned (up true, status of the probe).
type KeyState func(name string, up bool, status int)

// DefaultProbeEvery is how often a disabled key is probed.
const DefaultProbeEvery = 30 * time.Second

// errNoKey is a request no key of the pool may take: every key that
// serves its model was refused by the upstream.
var errNoKey = fmt.Errorf("%w: no server key left", errKeyRefused)

// errModelNotServed is a request for a model that no key's globs admit.
var errModelNotServed = errors.New("no server key serves the model")

// poolKey is one key of the pool and what the pool learned of it.
type poolKey struct {
	name          string   // the operator's name, or the fingerprint
	tenant        string   // Fingerprint of the URL and key: names its models cache and fleet state
	authorization []string // "Bearer <key>", shared and never mutated
	weight        int64
	models        []string // globs; nil for every model
	exhausted     *exhaustion

	down   atomic.Bool  // refused by the upstream (401/403), until a probe passes
	downAt atomic.Int64 // unix nanoseconds it was last taken out
	worked atomic.Int64 // unix nanoseconds a check (pool.works) last passed
	// checking makes the checks of a key one at a time: a burst of
	// requests it refused waits for one check, not one each.
	checking sync.Mutex
	// room is the share of the key's window the upstream last said was
	// left, in millionths, valid until roomUntil (unix nanoseconds);
	// unknown (a full share) past it.
	room      atomic.Int64
	roomUntil atomic.Int64

	current int64 // smooth weighted round robin's running weight; pool.mu
}

// admits reports whether the key serves model ("" for a request of no
// model: every key does).
func (k *poolKey) admits(model string, match func(glob, model string) bool) bool {
	if model == "" || len(k.models) == 0 {
		return true
	}
	for _, g := range k.models {
		if match(g, model) {
			return true
		}
	}
	return false
}

// share is the key's effective weight at now: its weight times the room
// it has left (a full share when unknown), never below 1 so that a key
// the upstream has not locked keeps a trickle.
func (k *poolKey) share(now int64) int64 {
	if k.roomUntil.Load() < now {
		return k.weight * 1e6
	}
	return max(k.weight*k.room.Load(), 1)
}

// learn takes in the standing an answer reports: the smallest share left
// of the key's requests and tokens (X-RateLimit-Remaining/Limit and
// OpenAI's per-kind x-ratelimit-*), until its reset.
func (k *poolKey) learn(h http.Header, now time.Time) {
	best, until := int64(-1), time.Time{}
	for _, kind := range [...][3]string{
		{"X-Ratelimit-Remaining", "X-Ratelimit-Limit", "X-Ratelimit-Reset"},
		{"X-Ratelimit-Remaining-Requests", "X-Ratelimit-Limit-Requests", "X-Ratelimit-Reset-Requests"},
		{"X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Limit-Tokens", "X-Ratelimit-Reset-Tokens"},
	} {
		left, lerr := strconv.ParseFloat(h.Get(kind[0]), 64)
		limit, merr := strconv.ParseFloat(h.Get(kind[1]), 64)
		ratio := left / limit
		if lerr != nil || merr != nil || limit <= 0 || math.IsNaN(ratio) {
			continue // "Inf" of "Inf" says nothing either
		}
		share := int64(min(max(ratio, 0), 1) * 1e6)
		reset, ok := parseReset(h.Get(kind[2]), now)
		if !ok {
			reset = now.Add(time.Minute)
		}
		if best < 0 || share < best {
			best, until = share, reset
		}
	}
	if best >= 0 {
		k.room.Store(best)
		k.roomUntil.Store(until.UnixNano())
	}
}

// pool is the server keys of an upstream. Picking a key takes pool.mu
// only when there are several; a pool of one decides with atomics.
type pool struct {
	keys       []*poolKey
	match      func(glob, model string) bool
	state      KeyState // nil for none
	probeEvery time.Duration
	logger     *zap.Logger
	// check sends the probe's request (GET <base>/models) with k, and
	// returns the upstream's status, 0 when none came; nil checks nothing.
	check func(ctx context.Context, k *poolKey) int
	// startProber starts the goroutine that probes the keys out of the
	// pool, the first time one is taken out; probing says it was.
	startProber func()
	probing     atomic.Bool

	mu sync.Mutex // protects the keys' current
}

// downHold is how long the fleet's store holds a key refused without a
// failed probe renewing it; past it, each instance learns again.
const downHold = 10 * time.Minute

// newPool makes the pool of keys, refusing an empty one, a key twice and
// a name twice.
func newPool(url string, keys []ServerKey, cfg *Config, logger *zap.Logger) (*pool, error) {
	if len(keys) == 0 {
		return nil, errors.New("empty upstream API key")
	}
	p := &pool{match: cfg.MatchModel, state: cfg.KeyState, probeEvery: cfg.ProbeEvery, logger: logger}
	if p.match == nil {
		p.match = func(glob, model string) bool { return glob == model }
	}
	if p.probeEvery <= 0 {
		p.probeEvery = DefaultProbeEvery
	}
	seen := make(map[string]bool, 2*len(keys))
	for i, k := range keys {
		if k.Key == "" {
			return nil, fmt.Errorf("server key %d: empty upstream API key", i+1)
		}
		tenant := Fingerprint(url, k.Key)
		name := k.Name
		if name == "" {
			name = tenant
		}
		if seen["key "+tenant] {
			return nil, fmt.Errorf("server key %d (%s): the same key as another", i+1, name)
		}
		if seen["name "+name] {
			return nil, fmt.Errorf("server key %d: name '%s' used twice", i+1, name)
		}
		seen["key "+tenant], seen["name "+name] = true, true
		shared := cfg.Shared
		if cfg.SharedFor != nil {
			shared = cfg.SharedFor(tenant)
		}
		pk := &poolKey{
			name:          name,
			tenant:        tenant,
			authorization: []string{"Bearer " + k.Key},
			weight:        int64(max(k.Weight, 1)),
			models:        k.Models,
			exhausted:     newExhaustion(cfg.Lockout, shared, logger),
		}
		pk.exhausted.spent = cfg.Spent
		if shared != nil {
			pk.exhausted.fleetDown = func(down bool, now time.Time) { p.fleetSaid(pk, down, now) }
		}
		p.keys = append(p.keys, pk)
	}
	return p, nil
}

// names reports whether b, an upstream's answer, holds one of the pool's
// keys: as it is, or escaped in a JSON string (an upstream that echoes
// the request's Authorization header in its error, say).
func (p *pool) names(b []byte) bool {
	secrets := make([]string, len(p.keys))
	for i, k := range p.keys {
		secrets[i] = strings.TrimPrefix(k.authorization[0], "Bearer ")
		if bytes.Contains(b, []byte(secrets[i])) {
			return true
		}
	}
	if bytes.IndexByte(b, '\\') < 0 {
		return false // nothing escaped: nothing more to find
	}
	var doc any
	if json.Unmarshal(b, &doc) != nil {
		return false
	}
	return namesIn(doc, secrets)
}

// namesIn reports whether a string of the decoded JSON v holds one of
// secrets.
func namesIn(v any, secrets []string) bool {
	switch v := v.(type) {
	case string:
		for _, key := range secrets {
			if strings.Contains(v, key) {
				return true
			}
		}
	case []any:
		for _, e := range v {
			if namesIn(e, secrets) {
				return true
			}
		}
	case map[string]any:
		for k, e := range v {
			if namesIn(k, secrets) || namesIn(e, secrets) {
				return true
			}
		}
	}
	return false
}

// pick chooses the key for a request of model at now: among the keys up
// that serve it and are not known spent for it, by smooth weighted round
// robin over their shares, so that with no standing learned requests
// spread exactly by weight, and a key the upstream says has less room
// gets less. When every such key is spent it picks the one that opens
// first (the caller was let through on a probe, or raced a lockout).
func (p *pool) pick(model string, now time.Time) (*poolKey, error) {
	return p.pickBut(model, now, nil)
}

// pickBut is pick, passing over the keys in tried: they refused the
// request (401 or 403), though they work. When only those are left, the
// request is refused by the upstream (errRequestRefused).
func (p *pool) pickBut(model string, now time.Time, tried []*poolKey) (*poolKey, error) {
	if len(p.keys) == 1 {
		k := p.keys[0]
		switch {
		case !k.admits(model, p.match):
			return nil, errModelNotServed
		case k.down.Load():
			return nil, errNoKey
		case slices.Contains(tried, k):
			return nil, errRequestRefused
		}
		return k, nil
	}
	ns := now.UnixNano()
	p.mu.Lock()
	defer p.mu.Unlock()
	var best, soonest *poolKey
	var total int64
	var soonestWait time.Duration
	served, refused := false, false
	for _, k := range p.keys {
		if !k.admits(model, p.match) {
			continue
		}
		served = true
		if k.down.Load() {
			continue
		}
		if slices.Contains(tried, k) {
			refused = true
			continue
		}
		if wait, spent := k.exhausted.peek(model, now); spent {
			if soonest == nil || wait < soonestWait {
				soonest, soonestWait = k, wait
			}
			continue
		}
		s := k.share(ns)
		k.current += s
		total += s
		if best == nil || k.current > best.current {
			best = k
		}
	}
	switch {
	case best != nil:
		best.current -= total
		return best, nil
	case soonest != nil:
		return soonest, nil
	case !served:
		return nil, errModelNotServed
	case refused:
		return nil, errRequestRefused
	}
	return nil, errNoKey
}

// openFor reports whether a key that serves model may take a request at
// now: up, and not known spent for it.
func (p *pool) openFor(model string, now time.Time) bool {
	for _, k := range p.keys {
		if k.admits(model, p.match) && !k.down.Load() {
			if _, spent := k.exhausted.peek(model, now); !spent {
				return true
			}
		}
	}
	return false
}

// exhausted reports whether no key that serves model may take a request
// at now, and the soonest one opens. Keys whose scopes are all open
// answer first; only when none is does a key's check, which may claim a
// probe, decide.
func (p *pool) exhaustedFor(ctx context.Context, model string, now time.Time) (time.Duration, bool, ProbeClaim) {
	if len(p.keys) == 1 {
		k := p.keys[0]
		if k.down.Load() || !k.admits(model, p.match) {
			k.exhausted.fetch(now)        // the fleet may have it back
			return 0, false, ProbeClaim{} // the transport answers that
		}
		return k.exhausted.check(ctx, model, now)
	}
	var soonest time.Duration
	candidates, open := 0, false
	for _, k := range p.keys {
		// What the fleet says of every key, the refused ones included,
		// counts from the next request on.
		k.exhausted.fetch(now)
		if open || k.down.Load() || !k.admits(model, p.match) {
			continue
		}
		candidates++
		if _, spent := k.exhausted.peek(model, now); !spent {
			open = true
		}
	}
	if open || candidates == 0 { // none: the transport answers that
		return 0, false, ProbeClaim{}
	}
	found := false
	for _, k := range p.keys {
		if k.down.Load() || !k.admits(model, p.match) {
			continue
		}
		wait, spent, claim := k.exhausted.check(ctx, "", now)
		if !spent && model != "" {
			var modelClaim ProbeClaim
			if wait, spent, modelClaim = k.exhausted.check(ctx, model, now); spent {
				claim.Release()
			} else if modelClaim.s[0] != nil {
				claim.s[1], claim.at = modelClaim.s[0], now
			}
		}
		if !spent {
			return 0, false, claim
		}
		if !found || wait < soonest {
			soonest, found = wait, true
		}
	}
	return soonest, true, ProbeClaim{}
}

// refused takes k out of the pool after the upstream answered status
// (401 or 403) to it, reporting whether it was up.
func (p *pool) refused(k *poolKey, status int) bool {
	if !p.takeOut(k, status) {
		return false
	}
	p.share(k, true)
	return true
}

// checkEvery is how long a check that a key works holds: what requests
// the upstream refuses though their key works cost it at most one check a
// key in that time.
const checkEvery = time.Second

// checkTimeout bounds a check, which the request that called for it
// waits for, even if its caller left.
const checkTimeout = 5 * time.Second

// works reports whether k answers the probe's request with 2xx, now or
// within checkEvery: then a 401 or 403 it gave a request is about that
// request (a model or an endpoint the key's project may not use, say),
// and no reason to take the key out of the pool for every caller.
func (p *pool) works(ctx context.Context, k *poolKey) bool {
	if p.check == nil {
		return false
	}
	if time.Now().UnixNano()-k.worked.Load() < int64(checkEvery) {
		return true
	}
	k.checking.Lock()
	defer k.checking.Unlock()
	switch {
	case time.Now().UnixNano()-k.worked.Load() < int64(checkEvery):
		return true // checked while this one waited
	case k.down.Load():
		return false // failed a check while this one waited
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), checkTimeout)
	defer cancel()
	if status := p.check(ctx, k); status < 200 || status >= 300 {
		return false
	}
	k.worked.Store(time.Now().UnixNano())
	return true
}

// takeOut marks k down, reporting whether it was up.
func (p *pool) takeOut(k *poolKey, status int) bool {
	k.downAt.Store(time.Now().UnixNano())
	if !k.down.CompareAndSwap(false, true) {
		return false
	}
	if p.probing.CompareAndSwap(false, true) && p.startProber != nil {
		p.startProber()
	}
	p.logger.Error("upstream refused a server key, or the fleet says it did; it is out of the pool until a probe passes",
		zap.String("key", k.name), zap.Int("upstream_status", status), zap.Int("keys_up", p.up()))
	if p.state != nil {
		p.state(k.name, false, status)
	}
	return true
}

// restored returns k to the pool after a probe was answered status.
func (p *pool) restored(k *poolKey, status int) {
	if p.putBack(k, status) {
		p.share(k, false)
	}
}

// share tells the fleet that k is down, or back, off the request path.
func (p *pool) share(k *poolKey, down bool) {
	shared := k.exhausted.shared
	if shared == nil {
		return
	}
	now := time.Now()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
		defer cancel()
		var err error
		if down {
			err = shared.Publish(ctx, ScopeWord{Scope: DownScope, Until: now.Add(downHold), Noted: now})
		} else {
			err = shared.Clear(ctx, DownScope, now.Add(time.Millisecond))
		}
		if err != nil {
			p.logger.Warn("sharing a server key's state with the fleet failed", zap.String("key", k.name), zap.Error(err))
		}
	}()
}

// fleetSaid takes in whether the fleet holds k refused. A key taken out
// here lately stays out whatever the fleet says: the word may not have
// reached the store yet.
func (p *pool) fleetSaid(k *poolKey, down bool, now time.Time) {
	switch {
	case down && !k.down.Load():
		p.takeOut(k, 0)
	case !down && k.down.Load() && now.UnixNano()-k.downAt.Load() > int64(3*sharedEvery):
		p.putBack(k, 0)
	}
}

// putBack marks k up, reporting whether it was down.
func (p *pool) putBack(k *poolKey, status int) bool {
	if !k.down.CompareAndSwap(true, false) {
		return false
	}
	p.logger.Info("a server key works again; it is back in the pool", zap.String("key", k.name), zap.Int("upstream_status", status))
	if p.state != nil {
		p.state(k.name, true, status)
	}
	return true
}

// up counts the keys in the pool.
func (p *pool) up() int {
	n := 0
	for _, k := range p.keys {
		if !k.down.Load() {
			n++
		}
	}
	return n
}

// probe checks every key out of the pool, returning to it those
// answered 2xx.
func (p *pool) probe(ctx context.Context) {
	for _, k := range p.keys {
		if !k.down.Load() {
			continue
		}
		if shared := k.exhausted.shared; shared != nil {
			// One instance of the fleet probes a key at a time; the store
			// down, each probes on its own.
			if ours, err := shared.ClaimProbe(ctx, DownScope, p.probeEvery); err == nil && !ours {
				continue
			}
		}
		switch status := p.check(ctx, k); {
		case status >= 200 && status < 300:
			p.restored(k, status)
		case status == http.StatusUnauthorized || status == http.StatusForbidden:
			p.share(k, true) // still refused: the fleet holds it out longer
		}
	}
}

// checkWith has the pool check its keys (probes, and works) with GET url,
// the upstream's models, through rt.
func (p *pool) checkWith(rt http.RoundTripper, url, host string) {
	p.check = func(ctx context.Context, k *poolKey) int { return p.probeKey(ctx, rt, url, host, k) }
}

// probeKey sends GET url through rt with k, and returns the status
// answered, 0 when none came.
func (p *pool) probeKey(ctx context.Context, rt http.RoundTripper, url, host string, k *poolKey) int {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0
	}
	req.Host = host
	req.Header["Authorization"] = k.authorization
	req.Header.Set("Accept", "application/json")
	res, err := rt.RoundTrip(req)
	if err != nil {
		if ce := p.logger.Check(zap.DebugLevel, "probing a server key failed"); ce != nil {
			ce.Write(zap.String("key", k.name), zap.Error(err))
		}
		return 0
	}
	discard(res)
	return res.StatusCode
}

// run probes the keys out of the pool every probeEvery until ctx ends.
func (p *pool) run(ctx context.Context) {
	t := time.NewTicker(p.probeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			pctx, cancel := context.WithTimeout(ctx, max(p.probeEvery, 5*time.Second))
			p.probe(pctx)
			cancel()
		}
	}
}
