package tests

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"github.com/redis/go-redis/v9"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// otherModel is a model the upstream's per-model limits leave alone.
const otherModel = "vigthoria-pro-1"

// answer is what a test reads of one proxied answer.
type answer struct {
	status     int
	code       string // the error's code, "" for none
	retryAfter int    // seconds; -1 without the header
}

// chatAt sends one chat completion of model to base (a site, or a route
// under it) with key.
func chatAt(t *testing.T, base, key, model string) answer {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/v1/chat/completions",
		jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}))
	req.Header.Set("Authorization", "Bearer "+key)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("chat: %v", err)
	}
	defer res.Body.Close()
	a := answer{status: res.StatusCode, retryAfter: -1}
	if v := res.Header.Get("Retry-After"); v != "" {
		a.retryAfter, _ = strconv.Atoi(v)
	}
	if res.StatusCode != http.StatusOK {
		var e apiError
		body, _ := io.ReadAll(res.Body)
		json.Unmarshal(body, &e)
		a.code = e.Error.Code
	}
	return a
}

// locked reports whether a is the proxy's own refusal while the upstream
// is exhausted.
func (a answer) locked() bool {
	return a.status == http.StatusTooManyRequests && a.code == "upstream_rate_limited"
}

// callsFor counts the requests the upstream received for model since
// request number from.
func callsFor(up *standin.Server, from int, model string) int {
	n := 0
	for _, r := range up.Requests()[from:] {
		if strings.Contains(string(r.Body), `"model":"`+model+`"`) {
			n++
		}
	}
	return n
}

// OpenAI-style limits are per model: one model's exhausted token count,
// with a reset 720 hours away, stops neither another model nor, past the
// lockout bound, the model itself.
func TestUpstreamExhaustionStaysWithItsModel(t *testing.T) {
	e := start(t, "retries 0")
	e.upstream.SetBehavior(standin.Behavior{ForModel: model, Headers: http.Header{
		"X-Ratelimit-Remaining-Tokens": {"0"}, "X-Ratelimit-Reset-Tokens": {"720h"}}})
	if a := chatAt(t, e.caddy.URL, e.key, model); a.status != http.StatusOK {
		t.Fatalf("the answer that spends the model's tokens: %+v, want 200", a)
	}
	e.upstream.SetBehavior(standin.Behavior{})
	calls := e.upstream.Count()
	if a := chatAt(t, e.caddy.URL, e.key, otherModel); a.status != http.StatusOK {
		t.Errorf("another model after one model's tokens were spent: %+v, want 200", a)
	}
	a := chatAt(t, e.caddy.URL, e.key, model)
	if !a.locked() || a.retryAfter < 1 || a.retryAfter > 60 {
		t.Errorf("the spent model: %+v, want upstream_rate_limited for at most the 60s bound", a)
	}
	if n := callsFor(e.upstream, calls, model); n != 0 {
		t.Errorf("the upstream got %d requests for the spent model within the bound, want 0", n)
	}
	t.Logf("another model: 200; the spent model: Retry-After %d", a.retryAfter)
}

// A reset far away locks a model for upstream_lockout at most; then one
// request at a time probes the upstream: refused, the lockout starts
// again; answered, the model is open.
func TestUpstreamLockoutIsBoundedAndProbed(t *testing.T) {
	const lockout = 2 * time.Second
	e := start(t, "retries 0", "upstream_lockout 2s")
	refusing := standin.Behavior{ForModel: model, FailStatus: http.StatusTooManyRequests, Headers: http.Header{
		"Retry-After": {"2592000"}, "X-Ratelimit-Remaining-Requests": {"0"}, "X-Ratelimit-Reset-Requests": {"720h"}}}
	e.upstream.SetBehavior(refusing)
	if a := chatAt(t, e.caddy.URL, e.key, model); a.status != http.StatusTooManyRequests || a.code != "rate_limit_exceeded" {
		t.Fatalf("the upstream's 429: %+v, passed back", a)
	}
	locked := time.Now()
	a := chatAt(t, e.caddy.URL, e.key, model)
	if !a.locked() || a.retryAfter > 2 {
		t.Fatalf("right after: %+v, want upstream_rate_limited with Retry-After at most 2 (the bound), not 2592000", a)
	}
	if a := chatAt(t, e.caddy.URL, e.key, otherModel); a.status != http.StatusOK {
		t.Errorf("another model: %+v, want 200", a)
	}

	// Past the bound, many callers at once: one reaches the upstream.
	time.Sleep(time.Until(locked.Add(lockout + 100*time.Millisecond)))
	slow := refusing
	slow.Latency = 300 * time.Millisecond
	e.upstream.SetBehavior(slow)
	calls := e.upstream.Count()
	answers := make([]answer, 8)
	var wg sync.WaitGroup
	for i := range answers {
		wg.Go(func() { answers[i] = chatAt(t, e.caddy.URL, e.key, model) })
	}
	wg.Wait()
	if n := callsFor(e.upstream, calls, model); n != 1 {
		t.Errorf("past the bound, %d of 8 concurrent requests reached the upstream, want 1 probe", n)
	}
	probes := 0
	for _, a := range answers {
		switch {
		case a.code == "rate_limit_exceeded":
			probes++
		case !a.locked():
			t.Errorf("beside the probe: %+v, want upstream_rate_limited", a)
		}
	}
	if probes != 1 {
		t.Errorf("%d callers got the upstream's own 429, want the one probe", probes)
	}
	// The probe was refused: locked again, without asking.
	calls = e.upstream.Count()
	if a := chatAt(t, e.caddy.URL, e.key, model); !a.locked() {
		t.Errorf("after a refused probe: %+v, want upstream_rate_limited", a)
	}
	if n := callsFor(e.upstream, calls, model); n != 0 {
		t.Errorf("the upstream got %d requests right after a refused probe, want 0", n)
	}

	// The upstream recovers: the next probe reopens the model.
	e.upstream.SetBehavior(standin.Behavior{})
	waitFor(t, 3*lockout, "a probe reopens the model", func() bool {
		return chatAt(t, e.caddy.URL, e.key, model).status == http.StatusOK
	})
	for i := range 3 {
		if a := chatAt(t, e.caddy.URL, e.key, model); a.status != http.StatusOK {
			t.Errorf("request %d after a successful probe: %+v, want 200", i+1, a)
		}
	}
}

// tenants is one Caddy site with two routes, /a and /b, each a vigthoria
// handler with its own server key on one upstream URL: two tenants.
func tenantsSite(upstream, store string, extra ...string) string {
	route := func(prefix, keyEnv string) string {
		lines := append([]string{"upstream " + upstream, "api_key {env." + keyEnv + "}", "store " + store,
			manyFailures, "store_timeout 2s", "retries 0", "tier metered"}, extra...)
		return "\thandle_path " + prefix + "/* {\n\t\tvigthoria {\n\t\t\t" + strings.Join(lines, "\n\t\t\t") + "\n\t\t}\n\t}"
	}
	return route("/a", "VIGTHORIA_TEST_KEY") + "\n" + route("/b", "VIGTHORIA_TEST_KEY_B")
}

// tenantKeyB is the second tenant's server key.
const tenantKeyB = "vig-server-key-tenant-b-SECRET"

// TestUpstreamProbeGoesUpstream: past the lockout of a key the upstream
// said was spent, the one probe is let through to a request that reaches
// the upstream. A request the proxy refuses itself (a body that is not
// JSON), though let through the key's check first, gives the probe back:
// the next caller's request is the probe, and is served by the healthy
// upstream. Before, one such request each probe interval kept every
// caller locked out.
func TestUpstreamProbeGoesUpstream(t *testing.T) {
	const lockout = 2 * time.Second
	e := start(t, "retries 0", "upstream_lockout 2s")
	victim := createKey(t, strings.TrimPrefix(e.store, "sqlite:"), "pro")
	e.waitKeysKnown(t)
	e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusTooManyRequests, RetryAfter: 2592000}) // spent for a month
	if a := chatAt(t, e.caddy.URL, victim, model); a.status != http.StatusTooManyRequests {
		t.Fatalf("the upstream's 429: %+v", a)
	}
	locked := time.Now()
	e.upstream.SetBehavior(standin.Behavior{}) // healthy again
	time.Sleep(time.Until(locked.Add(lockout + 100*time.Millisecond)))
	if s := e.status(t, http.MethodPost, "/v1/chat/completions", `{not json`, http.Header{"Content-Type": {"application/json"}}); s != http.StatusBadRequest {
		t.Fatalf("a body that is not JSON: %d, want 400", s)
	}
	if a := chatAt(t, e.caddy.URL, victim, model); a.status != http.StatusOK {
		t.Errorf("past the lockout, the upstream healthy, right after a request that never went upstream: %+v, want 200 (the probe)", a)
	}
}

// Two tenants with their own server keys on one upstream URL, on a fleet
// of two sharing Redis: one tenant's spent key locks out neither the
// other tenant anywhere, nor its own callers past the bound; a probe
// from one instance reopens it for the fleet, and what Redis keeps of it
// names no key and outlives no bound.
func TestFleetUpstreamLockoutIsPerServerKey(t *testing.T) {
	const lockout = 2 * time.Second
	rs := redistest.Start(t)
	up := standin.New(standin.Options{APIKey: serverKey, Accounts: map[string][]string{tenantKeyB: nil}})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	st, err := redisstore.Open(rs.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, key, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "fleet", Tier: "metered"}, time.Now())
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	t.Setenv("VIGTHORIA_TEST_KEY_B", tenantKeyB)
	site := tenantsSite(srv.URL+"/v1", "redis "+rs.URL, "upstream_lockout 2s")
	a := harness.StartCaddy(t, site)
	b := harness.StartProcess(t, site)

	// Tenant a's key is spent, by the bare Vigthoria headers, which speak
	// of the whole key, for 100000 seconds.
	up.SetBehavior(standin.Behavior{ForKey: serverKey, FailStatus: http.StatusTooManyRequests, Headers: http.Header{
		"Retry-After": {"100000"}, "X-Ratelimit-Remaining": {"0"}, "X-Ratelimit-Reset": {"100000"}}})
	if got := chatAt(t, a.URL+"/a", key, model); got.code != "rate_limit_exceeded" {
		t.Fatalf("tenant a on A: %+v, want the upstream's 429", got)
	}
	spent := time.Now()
	waitFor(t, 3*time.Second, "B hears of tenant a's spent key", func() bool {
		return chatAt(t, b.URL+"/a", key, otherModel).locked()
	})
	if got := chatAt(t, b.URL+"/a", key, model); !got.locked() || got.retryAfter > 2 {
		t.Errorf("tenant a on B: %+v, want upstream_rate_limited for at most the 2s bound", got)
	}
	// Each instance looks at the fleet's word once a second: tenant b is
	// asked for long enough that both have looked.
	for until := time.Now().Add(1500 * time.Millisecond); time.Now().Before(until); time.Sleep(100 * time.Millisecond) {
		for name, base := range map[string]string{"A": a.URL + "/b", "B": b.URL + "/b"} {
			if got := chatAt(t, base, key, model); got.status != http.StatusOK {
				t.Fatalf("tenant b on %s while tenant a's key is spent: %+v, want 200", name, got)
			}
		}
	}

	// What Redis holds names no key and ends within the bounds.
	rc := redis.NewClient(&redis.Options{Addr: rs.Addr})
	defer rc.Close()
	names, err := rc.Keys(t.Context(), "vgt:upstream:*").Result()
	if err != nil || len(names) == 0 {
		t.Fatalf("the fleet's lockout in Redis: %v %v", names, err)
	}
	for _, name := range names {
		if strings.Contains(name, serverKey) || strings.Contains(name, tenantKeyB) || strings.Contains(name, srv.URL) {
			t.Errorf("Redis key %q names a server key or the upstream", name)
		}
		if ttl := rc.PTTL(t.Context(), name).Val(); ttl <= 0 || ttl > 2*lockout {
			t.Errorf("Redis key %q lives %v, want at most %v", name, ttl, 2*lockout)
		}
	}

	// The upstream recovers: past the bound, one probe in the fleet
	// reopens tenant a everywhere.
	up.SetBehavior(standin.Behavior{Latency: 300 * time.Millisecond})
	time.Sleep(time.Until(spent.Add(lockout + 100*time.Millisecond)))
	calls := len(up.Requests())
	var wg sync.WaitGroup
	answers := make([]answer, 8)
	for i := range answers {
		base := a.URL + "/a"
		if i%2 == 1 {
			base = b.URL + "/a"
		}
		wg.Go(func() { answers[i] = chatAt(t, base, key, model) })
	}
	wg.Wait()
	reached := 0
	for _, r := range up.Requests()[calls:] {
		if r.Header.Get("Authorization") == "Bearer "+serverKey {
			reached++
		}
	}
	if reached != 1 {
		t.Errorf("past the bound, %d of 8 requests across the fleet reached the upstream, want 1 probe", reached)
	}
	up.SetBehavior(standin.Behavior{})
	waitFor(t, 3*time.Second, "both instances serve tenant a again", func() bool {
		return chatAt(t, a.URL+"/a", key, model).status == http.StatusOK && chatAt(t, b.URL+"/a", key, model).status == http.StatusOK
	})
}

// Two tenants with their own server keys on one upstream URL each see
// their own model list, private models included, never the other's.
func TestModelsCacheIsKeyedByServerKey(t *testing.T) {
	// Keys of this run only: the model lists' cache outlives a config (a
	// reload keeps it), and an earlier test's stand-in may have had this
	// one's address, the kernel handing the port out again, with its own
	// lists for the same keys.
	run := strconv.FormatInt(time.Now().UnixNano(), 36)
	keyA, keyB := serverKey+"-"+run, tenantKeyB+"-"+run
	up := standin.New(standin.Options{APIKey: keyA, Models: []string{model, "ft:tenant-a-1"},
		Accounts: map[string][]string{keyB: {model, "ft:tenant-b-1"}}})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	path := filepath.Join(t.TempDir(), "keys.db")
	key := createKey(t, path, "metered")
	t.Setenv("VIGTHORIA_TEST_KEY", keyA)
	t.Setenv("VIGTHORIA_TEST_KEY_B", keyB)
	c := harness.StartCaddy(t, tenantsSite(srv.URL+"/v1", "sqlite "+path))
	list := func(prefix string) ([]string, string) {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, c.URL+prefix+"/v1/models", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		return modelIDs(t, res), res.Header.Get("X-Cache")
	}
	if got, _ := list("/a"); !slices.Equal(got, []string{model, "ft:tenant-a-1"}) {
		t.Errorf("tenant a lists %v", got)
	}
	got, cache := list("/b")
	if !slices.Equal(got, []string{model, "ft:tenant-b-1"}) {
		t.Errorf("tenant b lists %v (X-Cache %s), want its own models", got, cache)
	}
	if got, cache := list("/b"); cache != "HIT" || !slices.Contains(got, "ft:tenant-b-1") {
		t.Errorf("tenant b again: X-Cache %s, %v, want its own list from the cache", cache, got)
	}
	if got, _ := list("/a"); slices.Contains(got, "ft:tenant-b-1") {
		t.Errorf("tenant a lists tenant b's private model: %v", got)
	}
}
