package proxy

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// testPool makes a pool of keys on a test upstream, logging to logger
// (none when nil); model globs match by prefix before a '*'.
func testPool(logger *zap.Logger, keys ...ServerKey) *pool {
	if logger == nil {
		logger = zap.NewNop()
	}
	cfg := &Config{MatchModel: func(glob, model string) bool {
		prefix, wild := strings.CutSuffix(glob, "*")
		return model == glob || wild && strings.HasPrefix(model, prefix)
	}}
	p, err := newPool("https://api.example.com/v1", keys, cfg, logger)
	if err != nil {
		panic(err)
	}
	return p
}

// picks counts the keys p picks for n requests of any model at now, by
// name.
func picks(t *testing.T, p *pool, n int, now time.Time) map[string]int {
	t.Helper()
	counts := map[string]int{}
	for range n {
		k, err := p.pick("", now)
		if err != nil {
			t.Fatal(err)
		}
		counts[k.name]++
	}
	return counts
}

func TestPoolSpreadsByWeight(t *testing.T) {
	p := testPool(nil, ServerKey{Key: "a", Name: "a"}, ServerKey{Key: "b", Name: "b"}, ServerKey{Key: "c", Name: "c", Weight: 2})
	now := time.Unix(1700000000, 0)
	counts := map[string]int{}
	for range 400 {
		k, err := p.pick("vigthoria-fast-1", now)
		if err != nil {
			t.Fatal(err)
		}
		counts[k.name]++
	}
	if counts["a"] != 100 || counts["b"] != 100 || counts["c"] != 200 {
		t.Fatalf("got %v, want a:100 b:100 c:200", counts)
	}
	// Smooth: no key twice in a row but the heaviest, and never thrice.
	var last string
	run := 0
	for range 40 {
		k, _ := p.pick("", now)
		if k.name == last {
			run++
		} else {
			last, run = k.name, 1
		}
		if run > 2 {
			t.Fatalf("key %s picked %d times in a row", k.name, run)
		}
	}
}

func TestPoolPrefersRoom(t *testing.T) {
	p := testPool(nil, ServerKey{Key: "a", Name: "a"}, ServerKey{Key: "b", Name: "b"})
	now := time.Unix(1700000000, 0)
	// a has a tenth of its window left, b all of it.
	p.keys[0].learn(http.Header{"X-Ratelimit-Limit": {"100"}, "X-Ratelimit-Remaining": {"10"}, "X-Ratelimit-Reset": {"60"}}, now)
	p.keys[1].learn(http.Header{"X-Ratelimit-Limit-Requests": {"100"}, "X-Ratelimit-Remaining-Requests": {"100"}}, now)
	counts := picks(t, p, 110, now)
	if counts["a"] != 10 || counts["b"] != 100 {
		t.Fatalf("got %v, want a:10 b:100", counts)
	}
	// Past its reset, a's standing is unknown again: an even spread.
	counts = picks(t, p, 100, now.Add(2*time.Minute))
	if counts["a"] != 50 || counts["b"] != 50 {
		t.Fatalf("after the reset got %v, want a:50 b:50", counts)
	}
}

// An upstream's figures that are not numbers, or infinite, or negative,
// teach nothing past the bounds of a share: the keys stay picked evenly,
// or by what a valid figure says.
func TestPoolLearnsOnlyFigures(t *testing.T) {
	p := testPool(nil, ServerKey{Key: "a", Name: "a"}, ServerKey{Key: "b", Name: "b"})
	now := time.Unix(1700000000, 0)
	for _, h := range []http.Header{
		{"X-Ratelimit-Limit": {"Inf"}, "X-Ratelimit-Remaining": {"Inf"}},
		{"X-Ratelimit-Limit": {"NaN"}, "X-Ratelimit-Remaining": {"5"}},
		{"X-Ratelimit-Limit": {"-5"}, "X-Ratelimit-Remaining": {"5"}},
		{"X-Ratelimit-Limit": {"100"}, "X-Ratelimit-Remaining": {"NaN"}},
		{"X-Ratelimit-Limit": {"1e400"}, "X-Ratelimit-Remaining": {"abc"}},
	} {
		p.keys[0].learn(h, now)
	}
	if counts := picks(t, p, 100, now); counts["a"] != 50 || counts["b"] != 50 {
		t.Fatalf("after figures that say nothing got %v, want a:50 b:50", counts)
	}
	// More left than the limit, or less than nothing: a share of 1 or 0.
	p.keys[0].learn(http.Header{"X-Ratelimit-Limit": {"100"}, "X-Ratelimit-Remaining": {"-1e300"}}, now)
	p.keys[1].learn(http.Header{"X-Ratelimit-Limit": {"100"}, "X-Ratelimit-Remaining": {"1e300"}}, now)
	if got := [2]int64{p.keys[0].room.Load(), p.keys[1].room.Load()}; got != [2]int64{0, 1e6} {
		t.Fatalf("shares %v, want [0 1000000]", got)
	}
}

func TestPoolSkipsExhaustedUntilReset(t *testing.T) {
	p := testPool(nil, ServerKey{Key: "a", Name: "a"}, ServerKey{Key: "b", Name: "b"})
	now := time.Now()
	p.keys[0].exhausted.heard(limitWord{keyUntil: now.Add(30 * time.Second)}, "", 429, now, now)
	p.keys[1].exhausted.heard(limitWord{modelUntil: now.Add(10 * time.Second)}, "m1", 429, now, now)
	for range 10 {
		if k, _ := p.pick("m2", now); k.name != "b" {
			t.Fatalf("m2 went to %s, want b (a is spent)", k.name)
		}
	}
	if wait, spent, _ := p.exhaustedFor(context.Background(), "m2", now); spent {
		t.Fatalf("m2 exhausted for %v, want served by b", wait)
	}
	wait, spent, _ := p.exhaustedFor(context.Background(), "m1", now)
	if !spent || wait != 10*time.Second {
		t.Fatalf("m1: got %v %v, want exhausted for 10s (b's model opens first)", wait, spent)
	}
	if _, spent, _ := p.exhaustedFor(context.Background(), "", now); spent {
		t.Fatal("the pool as a whole is exhausted, want b open")
	}
	// Past a's reset, a takes requests again.
	after := now.Add(31 * time.Second)
	seen := map[string]bool{}
	for range 4 {
		k, _ := p.pick("m2", after)
		seen[k.name] = true
	}
	if !seen["a"] || !seen["b"] {
		t.Fatalf("after the reset got %v, want both keys", seen)
	}
}

func TestPoolModels(t *testing.T) {
	p := testPool(nil, ServerKey{Key: "a", Name: "pro", Models: []string{"vigthoria-pro-*"}}, ServerKey{Key: "b", Name: "fast", Models: []string{"vigthoria-fast-*"}})
	now := time.Now()
	for model, want := range map[string]string{"vigthoria-pro-1": "pro", "vigthoria-fast-2": "fast"} {
		for range 3 {
			if k, err := p.pick(model, now); err != nil || k.name != want {
				t.Fatalf("%s: got %v %v, want %s", model, k, err, want)
			}
		}
	}
	if _, err := p.pick("vigthoria-embed-1", now); err != errModelNotServed {
		t.Fatalf("a model no key serves: got %v, want errModelNotServed", err)
	}
	if _, spent, _ := p.exhaustedFor(context.Background(), "vigthoria-embed-1", now); spent {
		t.Fatal("a model no key serves is exhausted, want it left to the transport's model_not_available")
	}
	p.refused(p.keys[0], 401)
	if _, err := p.pick("vigthoria-pro-1", now); err != errNoKey {
		t.Fatalf("the only pro key refused: got %v, want errNoKey", err)
	}
}

func TestPoolNameChecks(t *testing.T) {
	cfg := &Config{}
	for name, keys := range map[string][]ServerKey{
		"same key":  {{Key: "a"}, {Key: "a", Name: "x"}},
		"same name": {{Key: "a", Name: "x"}, {Key: "b", Name: "x"}},
		"empty":     {{Key: ""}},
		"none":      nil,
	} {
		if _, err := newPool("https://api.example.com/v1", keys, cfg, zap.NewNop()); err == nil {
			t.Errorf("%s: no error", name)
		} else if strings.Contains(err.Error(), "Bearer") {
			t.Errorf("%s: error %q names the key", name, err)
		}
	}
}

// keyedUpstream answers as the upstream would for each key: refused
// keys get 401, the others a small JSON 200. It counts requests per key.
type keyedUpstream struct {
	mu      sync.Mutex
	refused map[string]bool
	spent   map[string]bool // answered 429, the key spent for 30 s
	count   map[string]int
}

func (u *keyedUpstream) RoundTrip(req *http.Request) (*http.Response, error) {
	key := strings.TrimPrefix(req.Header.Get("Authorization"), "Bearer ")
	if req.Body != nil {
		_, _ = io.Copy(io.Discard, req.Body)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.count[key]++
	if u.spent[key] {
		h := http.Header{"Content-Type": {"application/json"}, "Retry-After": {"30"}, "X-Ratelimit-Remaining": {"0"}}
		return &http.Response{StatusCode: 429, Header: h, Body: io.NopCloser(strings.NewReader(`{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}`)), Request: req}, nil
	}
	if u.refused[key] {
		return &http.Response{StatusCode: 401, Header: http.Header{"Content-Type": {"application/json"}}, Body: io.NopCloser(strings.NewReader(`{"error":{"message":"Incorrect API key provided: ` + key + `"}}`)), Request: req}, nil
	}
	return &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {"application/json"}}, Body: io.NopCloser(strings.NewReader(`{"object":"list","data":[]}`)), Request: req}, nil
}

func (u *keyedUpstream) set(key string, refused bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.refused[key] = refused
}

func (u *keyedUpstream) n(key string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.count[key]
}

func TestPoolRefusedKeyRetriedAndProbed(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	var states []string
	var smu sync.Mutex
	up := &keyedUpstream{refused: map[string]bool{"sk-secret-b": true}, count: map[string]int{}}
	p := testPool(zap.New(core), ServerKey{Key: "sk-secret-a", Name: "a"}, ServerKey{Key: "sk-secret-b", Name: "b"})
	p.state = func(name string, isUp bool, status int) {
		smu.Lock()
		defer smu.Unlock()
		states = append(states, name+" "+map[bool]string{true: "up", false: "down"}[isUp])
	}
	tr := &keyTransport{next: up, host: "api.example.com", pool: p, logger: zap.New(core)}
	p.checkWith(up, "http://api.example.com/v1/models", "api.example.com")
	for i := range 6 {
		req, _ := http.NewRequest(http.MethodPost, "http://api.example.com/v1/chat/completions", bytes.NewReader([]byte(`{}`)))
		req.Header.Set("Content-Type", "application/json")
		c := &Call{Body: []byte(`{}`)}
		res, err := tr.roundTrip(req, c, nil)
		if err != nil || res.StatusCode != 200 {
			t.Fatalf("request %d: got %v %v, want 200 from the other key", i, res, err)
		}
		if c.Usage.Retries != 0 {
			t.Fatalf("request %d: %d retries counted, want none for a refused key", i, c.Usage.Retries)
		}
		res.Body.Close()
	}
	if n := up.n("sk-secret-b"); n != 2 {
		t.Fatalf("the refused key got %d requests, want exactly 2: one request, and the check that it is refused", n)
	}
	if !p.keys[1].down.Load() {
		t.Fatal("the refused key is still in the pool")
	}
	// A probe while still refused leaves it out; once restored, it is back.
	p.probe(context.Background())
	if !p.keys[1].down.Load() {
		t.Fatal("a probe answered 401 returned the key")
	}
	up.set("sk-secret-b", false)
	p.probe(context.Background())
	if p.keys[1].down.Load() {
		t.Fatal("a probe answered 200 left the key out")
	}
	smu.Lock()
	if strings.Join(states, ",") != "b down,b up" {
		t.Fatalf("states %v, want [b down, b up]", states)
	}
	smu.Unlock()
	// Every key refused: today's errKeyRefused.
	up.set("sk-secret-a", true)
	up.set("sk-secret-b", true)
	req, _ := http.NewRequest(http.MethodPost, "http://api.example.com/v1/chat/completions", bytes.NewReader([]byte(`{}`)))
	if _, err := tr.roundTrip(req, &Call{Body: []byte(`{}`)}, nil); err == nil || !strings.Contains(err.Error(), errKeyRefused.Error()) {
		t.Fatalf("every key refused: got %v, want errKeyRefused", err)
	}
	var refusedLine bool
	for _, e := range logs.All() {
		line := e.Message
		for k, v := range e.ContextMap() {
			line += " " + k + "=" + strings.ReplaceAll(strings.ReplaceAll(fmtAny(v), "\n", ""), "\t", "")
		}
		if strings.Contains(line, "sk-secret") {
			t.Fatalf("log line names a key: %s", line)
		}
		refusedLine = refusedLine || e.Level == zapcore.ErrorLevel && e.ContextMap()["key"] == "b"
	}
	if !refusedLine {
		t.Fatal("no error line naming key b by its name")
	}
}

// A 429 that says a key is spent goes at once to another key of the
// pool, whatever its wait; with none, to the queue's Hold when the
// request has one, which decides whether it is tried again or the 429
// is its answer.
func TestPoolSpentKeyRetriedElsewhereOrHeld(t *testing.T) {
	up := &keyedUpstream{spent: map[string]bool{"sk-a": true}, count: map[string]int{}}
	p := testPool(nil, ServerKey{Key: "sk-a", Name: "a"}, ServerKey{Key: "sk-b", Name: "b"})
	tr := &keyTransport{next: up, host: "api.example.com", pool: p, logger: zap.NewNop(),
		retry: retryPolicy{retries: 2, maxWait: 10 * time.Second}}
	chat := func(c *Call) (*http.Response, error) {
		req, _ := http.NewRequest(http.MethodPost, "http://api.example.com/v1/chat/completions", bytes.NewReader(c.Body))
		return tr.roundTrip(req, c, nil)
	}
	for p.keys[0].exhausted.key.locked.Load() == false {
		c := &Call{Body: []byte(`{}`)}
		res, err := chat(c)
		if err != nil || res.StatusCode != 200 {
			t.Fatalf("got %v %v, want 200 from key b", res, err)
		}
		res.Body.Close()
		if up.n("sk-a") == 1 && c.Usage.Retries != 1 {
			t.Errorf("the request that met the spent key: %d retries, want 1 (at once, on b)", c.Usage.Retries)
		}
	}
	if n := up.n("sk-a"); n != 1 {
		t.Errorf("the spent key got %d requests, want 1: it is skipped until its reset", n)
	}

	// Every key spent: the queue holds the retry.
	one := testPool(nil, ServerKey{Key: "sk-a", Name: "a"})
	tr.pool = one
	held := 0
	c := &Call{Body: []byte(`{}`), Hold: func(context.Context) bool {
		held++
		up.mu.Lock()
		up.spent["sk-a"] = false // the reset came while it waited
		up.mu.Unlock()
		one.keys[0].exhausted.key.openIfPast(time.Now().Add(time.Hour))
		return true
	}}
	res, err := chat(c)
	if err != nil || res.StatusCode != 200 || held != 1 {
		t.Fatalf("held once, then tried again: got %v %v after %d holds", res, err, held)
	}
	res.Body.Close()
	// The queue says no: the 429 is the answer, its body whole.
	up.mu.Lock()
	up.spent["sk-a"] = true
	up.mu.Unlock()
	c = &Call{Body: []byte(`{}`), Hold: func(context.Context) bool { return false }}
	res, err = chat(c)
	if err != nil || res.StatusCode != 429 {
		t.Fatalf("got %v %v, want the upstream's 429", res, err)
	}
	body, _ := io.ReadAll(res.Body)
	if !strings.Contains(string(body), "rate_limit_exceeded") {
		t.Errorf("the 429's body %q, want the upstream's error", body)
	}
}

func fmtAny(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	if e, ok := v.(error); ok {
		return e.Error()
	}
	return ""
}

func TestPoolProberStops(t *testing.T) {
	p := testPool(nil, ServerKey{Key: "a"})
	p.probeEvery = time.Millisecond
	up := &keyedUpstream{refused: map[string]bool{}, count: map[string]int{}}
	p.checkWith(up, "http://api.example.com/v1/models", "api.example.com")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.run(ctx); close(done) }()
	p.takeOut(p.keys[0], 401)
	deadline := time.Now().Add(10 * time.Second)
	for p.keys[0].down.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the prober never returned the key")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the prober did not stop with its context")
	}
}

// Two instances sharing one fleet: a key one of them found refused is
// out of the other's pool after its next fetch, and back once the fleet
// no longer holds it.
func TestPoolFleetDown(t *testing.T) {
	fleets := map[string]*fakeFleet{}
	sharedFor := func(fp string) SharedExhaustion {
		if fleets[fp] == nil {
			fleets[fp] = &fakeFleet{words: map[string]ScopeWord{}, claims: map[string]time.Time{}, now: time.Now()}
		}
		return fleets[fp]
	}
	mk := func() *pool {
		cfg := &Config{SharedFor: sharedFor}
		p, err := newPool("https://api.example.com/v1", []ServerKey{{Key: "a", Name: "a"}, {Key: "b", Name: "b"}}, cfg, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	one, two := mk(), mk()
	one.refused(one.keys[1], 401)
	fleet := fleets[one.keys[1].tenant]
	deadline := time.Now().Add(10 * time.Second)
	for {
		fleet.mu.Lock()
		_, held := fleet.words[DownScope]
		fleet.mu.Unlock()
		if held {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the refusal never reached the fleet")
		}
		time.Sleep(time.Millisecond)
	}
	two.exhaustedFor(context.Background(), "", time.Now())
	for !two.keys[1].down.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the other instance never took the key out")
		}
		time.Sleep(time.Millisecond)
	}
	if two.keys[0].down.Load() {
		t.Fatal("the other instance took out a key nobody refused")
	}
}

// TestPoolChecksAKeyOnceForABurst: a burst of requests the upstream
// refused with a key that works costs the upstream one check of it, not
// one a request.
func TestPoolChecksAKeyOnceForABurst(t *testing.T) {
	p := testPool(nil, ServerKey{Key: "a"})
	var checks atomic.Int32
	p.check = func(context.Context, *poolKey) int {
		checks.Add(1)
		time.Sleep(50 * time.Millisecond)
		return http.StatusOK
	}
	var wg sync.WaitGroup
	for range 100 {
		wg.Go(func() {
			if !p.works(context.Background(), p.keys[0]) {
				t.Error("a key that answers the check: does not work")
			}
		})
	}
	wg.Wait()
	if n := checks.Load(); n != 1 {
		t.Errorf("%d checks for a burst of 100, want 1", n)
	}
}
