package tests

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// startQueued is a site over a stand-in that enforces its own limits,
// with a tier "metered" of the given lines and the extra site lines.
func startQueued(t *testing.T, enforce standin.Enforce, tier []string, extra ...string) *env {
	t.Helper()
	up := standin.New(standin.Options{APIKey: serverKey, Enforce: enforce})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	lines := append([]string{manyFailures}, extra...)
	if len(tier) > 0 {
		lines = append(lines, "tier metered {\n\t\t\t"+strings.Join(tier, "\n\t\t\t")+"\n\t\t}")
	} else {
		lines = append(lines, "tier metered")
	}
	return startOn(t, up, srv, srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...)
}

// upstreamLimits is an upstream_limits block of the given lines.
func upstreamLimits(lines ...string) string {
	return "upstream_limits {\n\t\t\t" + strings.Join(lines, "\n\t\t\t") + "\n\t\t}"
}

// rawChat sends a chat completion as ctx allows, with key, of model,
// streamed or not.
func rawChat(ctx context.Context, e *env, key, model string, stream bool) (*http.Response, error) {
	body := `{"model":"` + model + `","messages":[{"role":"user","content":"hi"}],"stream":` + strconv.FormatBool(stream) + `}`
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.caddy.URL+"/v1/chat/completions", strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	return http.DefaultClient.Do(req)
}

// queueLength is the queue's length gauge of tier.
func queueLength(t *testing.T, e *env, tier string) float64 {
	return metricValue(t, e, `vigthoria_queue_length{tier="`+tier+`"}`)
}

// A burst of 100 requests from several callers, against a stand-in that
// enforces 20 requests a second and 4 at once, with upstream_limits at
// its rate (a smaller burst: network jitter may bunch requests up on
// their way) and its concurrency: the stand-in refuses none, and every
// caller gets its answer or the proxy's 429 with a Retry-After.
func TestQueueUpstreamLimitsNoUpstream429(t *testing.T) {
	e := startQueued(t, standin.Enforce{Requests: 20, Window: time.Second, Concurrent: 4}, nil,
		"queue 30s", upstreamLimits("requests 20/1s burst 5", "concurrent 4"))
	e.upstream.SetBehavior(standin.Behavior{Latency: 20 * time.Millisecond})
	keys := make([]string, 5)
	for i := range keys {
		_, keys[i] = e.addKey(t, "metered")
	}
	e.waitKeysKnown(t)
	var (
		wg            sync.WaitGroup
		mu            sync.Mutex
		ok, refused   int
		waitedHeaders int
	)
	for i := range 100 {
		// The SDK's defaults: 2 retries of a 429.
		c := openai.NewClient(option.WithBaseURL(e.caddy.URL+"/v1/"), option.WithAPIKey(keys[i%len(keys)]))
		wg.Go(func() {
			var res *http.Response
			_, err := c.Chat.Completions.New(t.Context(), chatParams("hi"), option.WithResponseInto(&res))
			mu.Lock()
			defer mu.Unlock()
			var apiErr *openai.Error
			switch {
			case err == nil:
				ok++
				if res.Header.Get("X-Vigthoria-Queue-Wait") != "" {
					waitedHeaders++
				}
			case errors.As(err, &apiErr) && apiErr.StatusCode == 429 && apiErr.Response.Header.Get("Retry-After") != "":
				refused++
			default:
				t.Errorf("request %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if n := e.upstream.Refused429(); n != 0 {
		t.Errorf("the stand-in refused %d requests with 429; want none", n)
	}
	if m := e.upstream.MaxActive(); m > 4 {
		t.Errorf("the stand-in answered %d at once; upstream_limits concurrent is 4", m)
	}
	if ok+refused != 100 || waitedHeaders == 0 {
		t.Errorf("%d answered, %d refused by the proxy, %d said they waited; want 100 in all, some waiting", ok, refused, waitedHeaders)
	}
	t.Logf("%d answered, %d refused by the proxy with Retry-After, %d waited", ok, refused, waitedHeaders)
}

// A tier of concurrent 1 that queues: a caller's second request waits
// for its first to end instead of a 429.
func TestQueueOwnConcurrencyWaits(t *testing.T) {
	e := startQueued(t, standin.Enforce{}, []string{"concurrent 1", "queue 30s"})
	e.upstream.SetBehavior(standin.Behavior{Latency: 300 * time.Millisecond})
	_, key := e.addKey(t, "metered")
	e.waitKeysKnown(t)
	res := make(chan *http.Response, 2)
	for range 2 {
		go func() {
			r, err := rawChat(t.Context(), e, key, model, false)
			if err != nil {
				t.Error(err)
			}
			res <- r
		}()
	}
	waited := 0
	for range 2 {
		r := <-res
		if r == nil {
			continue
		}
		r.Body.Close()
		if r.StatusCode != http.StatusOK {
			t.Errorf("status %d, want 200 for both", r.StatusCode)
		}
		if r.Header.Get("X-Vigthoria-Queue-Wait") != "" {
			waited++
		}
	}
	if waited != 1 {
		t.Errorf("%d answers said they waited, want the second one", waited)
	}
}

// A stream queued for the upstream's one slot gets no header until it is
// admitted; then it is answered whole, saying how long it waited.
func TestQueuedStreamSendsNothingUntilAdmitted(t *testing.T) {
	e := startQueued(t, standin.Enforce{}, nil, "queue 1m", upstreamLimits("concurrent 1"))
	e.upstream.SetBehavior(standin.Behavior{Latency: 3 * time.Second, ForModel: "vigthoria-pro-1"})
	_, key := e.addKey(t, "metered")
	e.waitKeysKnown(t)

	slow := make(chan *http.Response, 1)
	go func() {
		r, err := rawChat(t.Context(), e, key, "vigthoria-pro-1", false)
		if err != nil {
			t.Error(err)
		}
		slow <- r
	}()
	eventually(t, "the slow request holds the upstream's slot", func() bool { return e.upstream.Active() == 1 })
	streamed := make(chan *http.Response, 1)
	go func() {
		r, err := rawChat(t.Context(), e, key, model, true)
		if err != nil {
			t.Error(err)
		}
		streamed <- r
	}()
	eventually(t, "the stream is queued", func() bool { return queueLength(t, e, "metered") == 1 })
	select {
	case r := <-streamed:
		t.Fatalf("a queued stream got its headers: %d %v", r.StatusCode, r.Header)
	default:
	}
	if r := <-slow; r == nil || r.StatusCode != http.StatusOK {
		t.Fatalf("the slow request: %v", r)
	}
	r := <-streamed
	if r == nil {
		t.FailNow()
	}
	defer r.Body.Close()
	raw, _ := io.ReadAll(r.Body)
	body := string(raw)
	if r.StatusCode != http.StatusOK || r.Header.Get("X-Vigthoria-Queue-Wait") == "" || !strings.Contains(body, "[DONE]") {
		t.Errorf("the stream once admitted: %d, wait %q, body %q", r.StatusCode, r.Header.Get("X-Vigthoria-Queue-Wait"), body)
	}
}

// A caller that hangs up while queued leaves its place at once: the next
// is admitted when the slot frees, and the one that left is charged
// nothing.
func TestQueueCallerWhoLeavesFreesItsPlace(t *testing.T) {
	e := startQueued(t, standin.Enforce{}, nil, "queue 1m", upstreamLimits("concurrent 1"))
	e.upstream.SetBehavior(standin.Behavior{Latency: 3 * time.Second, ForModel: "vigthoria-pro-1"})
	_, holder := e.addKey(t, "metered")
	_, leaver := e.addKey(t, "metered")
	_, next := e.addKey(t, "metered")
	e.waitKeysKnown(t)

	slow := make(chan *http.Response, 1)
	go func() {
		r, _ := rawChat(t.Context(), e, holder, "vigthoria-pro-1", false)
		slow <- r
	}()
	eventually(t, "the slow request holds the upstream's slot", func() bool { return e.upstream.Active() == 1 })
	ctx, cancel := context.WithCancel(t.Context())
	left := make(chan error, 1)
	go func() {
		_, err := rawChat(ctx, e, leaver, model, false)
		left <- err
	}()
	eventually(t, "the leaver is queued", func() bool { return queueLength(t, e, "metered") == 1 })
	waiting := make(chan *http.Response, 1)
	go func() {
		r, _ := rawChat(t.Context(), e, next, model, false)
		waiting <- r
	}()
	eventually(t, "the next is queued", func() bool { return queueLength(t, e, "metered") == 2 })
	cancel()
	if err := <-left; err == nil {
		t.Fatal("the request whose caller left was answered")
	}
	eventually(t, "the leaver's place is freed", func() bool { return queueLength(t, e, "metered") == 1 })
	if r := <-slow; r == nil || r.StatusCode != http.StatusOK {
		t.Fatalf("the slow request: %v", r)
	}
	if r := <-waiting; r == nil || r.StatusCode != http.StatusOK {
		t.Fatalf("the next in line: %v", r)
	} else {
		r.Body.Close()
	}
	u, _ := e.usage(t, leaver)
	if u.Today.TotalTokens != 0 || len(u.ByModel) != 0 {
		t.Errorf("the caller who left was charged: %+v", u.Today)
	}
	if n := e.upstream.Count(); n != 2 {
		t.Errorf("the upstream got %d requests, want 2: the one that left never reached it", n)
	}
}

// With store redis and two instances, upstream_limits concurrent holds
// across both: the stand-in never answers more at once.
func TestQueueUpstreamLimitsAcrossFleet(t *testing.T) {
	f := startFleetWith(t, []string{"queue 1m", upstreamLimits("concurrent 2")})
	f.upstream.SetBehavior(standin.Behavior{Latency: 100 * time.Millisecond})
	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[int]int{}
	for i := range 16 {
		base := f.a.URL
		if i%2 == 1 {
			base = f.b.URL
		}
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/v1/chat/completions",
				strings.NewReader(`{"model":"`+model+`","messages":[{"role":"user","content":"hi"}]}`))
			req.Header.Set("Authorization", "Bearer "+f.key)
			req.Header.Set("Content-Type", "application/json")
			res, err := http.DefaultClient.Do(req)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Error(err)
				return
			}
			res.Body.Close()
			statuses[res.StatusCode]++
		})
	}
	wg.Wait()
	if statuses[http.StatusOK] != 16 {
		t.Errorf("statuses %v, want 16 answered", statuses)
	}
	if m := f.upstream.MaxActive(); m > 2 || m == 0 {
		t.Errorf("the stand-in answered %d at once; upstream_limits concurrent is 2 over the fleet", m)
	}
}

// While the upstream says the key is spent for a moment, a caller whose
// tier queues waits for the reset instead of a 429, then is answered.
func TestQueueWaitsOutTheUpstreamsExhaustion(t *testing.T) {
	e := start(t, "retries 0", "queue 10s")
	e.upstream.SetBehavior(standin.Behavior{ForModel: model, FailStatus: http.StatusTooManyRequests, FailCount: 1, Headers: http.Header{
		"Retry-After": {"1"}, "X-Ratelimit-Remaining-Requests": {"0"}, "X-Ratelimit-Reset-Requests": {"1s"}}})
	if a := chatAt(t, e.caddy.URL, e.key, model); a.status != http.StatusTooManyRequests || a.code != "rate_limit_exceeded" {
		t.Fatalf("the upstream's 429: %+v, passed back", a)
	}
	res, err := rawChat(t.Context(), e, e.key, model, false)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK || res.Header.Get("X-Vigthoria-Queue-Wait") == "" {
		t.Errorf("right after, with queue 10s: %d, queue wait %q; want 200 after a wait", res.StatusCode, res.Header.Get("X-Vigthoria-Queue-Wait"))
	}
}

// validateEdited validates the config of the Caddyfile lines with one
// piece of its JSON replaced: what only a JSON config can say.
func validateEdited(t *testing.T, lines []string, from, to string) error {
	t.Helper()
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	lines = append([]string{"store sqlite " + filepath.Join(t.TempDir(), "k.db")}, lines...)
	cfg, err := harness.Adapt("{\n\tadmin off\n}\n\nhttp://127.0.0.1:1 {\n" +
		vigthoriaBlock("http://127.0.0.1:1/v1", "{env.VIGTHORIA_TEST_KEY}", lines...) + "\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cfg), from) {
		t.Fatalf("the adapted config has no %s: %s", from, cfg)
	}
	var c caddy.Config
	if err := json.Unmarshal([]byte(strings.Replace(string(cfg), from, to, 1)), &c); err != nil {
		t.Fatal(err)
	}
	return caddy.Validate(&c)
}

// The queue's config in JSON is checked as the Caddyfile's is.
func TestQueueJSONConfigIsChecked(t *testing.T) {
	site := []string{"queue 5s", "tier metered {\n\t\t\tweight 2\n\t\t}", upstreamLimits("concurrent 2")}
	tier := []string{"tier metered {\n\t\t\tqueue 5s\n\t\t}"}
	const siteQueue, weight, limits = `"queue":{"max_wait":5000000000}`, `"weight":2`, `"upstream_limits":{"concurrent":2}`
	for name, tc := range map[string]struct {
		lines    []string
		from, to string
		want     string
	}{
		"valid":                 {site, weight, weight, ""},
		"max_wait 0":            {site, siteQueue, `"queue":{"length":10}`, "max_wait must be above 0"},
		"max_wait 11m":          {site, siteQueue, `"queue":{"max_wait":"11m"}`, "at most 10m"},
		"off and more":          {site, siteQueue, `"queue":{"off":true,"length":10}`, "off takes no"},
		"per_caller past len":   {site, siteQueue, `"queue":{"max_wait":"5s","length":10,"per_caller":20}`, "per_caller (20) must be at most length (10)"},
		"negative length":       {site, siteQueue, `"queue":{"max_wait":"5s","length":-1}`, "must be positive"},
		"weight 1001":           {site, weight, `"weight":1001`, "weight must be from 1 to 1000"},
		"weight -1":             {site, weight, `"weight":-1`, "weight must be from 1 to 1000"},
		"a tier's length":       {tier, siteQueue, `"queue":{"max_wait":"5s","length":10}`, "takes no length"},
		"no upstream limit":     {site, limits, `"upstream_limits":{}`, "set at least one"},
		"negative concurrent":   {site, limits, `"upstream_limits":{"concurrent":-1}`, "must be positive"},
		"a rate without window": {site, limits, `"upstream_limits":{"requests":{"n":5}}`, "positive n and window"},
	} {
		err := validateEdited(t, tc.lines, tc.from, tc.to)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: validate said %v, want %q", name, err, tc.want)
		}
	}
}

// Without upstream_limits, the queue learns the upstream's pace from its
// word: a burst that meets the stand-in's 429s waits in the queue and is
// retried at the pace (every caller answered), and from then on the
// queue sends at most what the stand-in served, so that two tiers kept
// backlogged get their weights' shares of it in order, and the stand-in
// refuses (nearly) nothing more. Before the pace, the queue held its waiters only while
// the key was locked, then let them all go at once: the rush spent the
// key again, and the shares were those of the demand.
func TestQueueLearnsTheUpstreamsPace(t *testing.T) {
	e := startQueued(t, standin.Enforce{Requests: 10, Window: time.Second}, nil, "queue 20s",
		"tier gold {\n\t\t\tweight 3\n\t\t}", "tier basic {\n\t\t\tweight 1\n\t\t}")
	_, pro := e.addKey(t, "gold")
	_, free := e.addKey(t, "basic")
	e.waitKeysKnown(t)

	// A burst the stand-in cannot take: the queue learns from its 429s.
	var wg sync.WaitGroup
	var bmu sync.Mutex
	burst := map[int]int{}
	for range 30 {
		wg.Go(func() {
			res, err := rawChat(t.Context(), e, free, "vigthoria-fast-1", false)
			if err != nil {
				t.Error(err)
				return
			}
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			bmu.Lock()
			burst[res.StatusCode]++
			bmu.Unlock()
		})
	}
	wg.Wait()
	// What met a 429 waited in the queue, retried at its pace.
	if burst[http.StatusOK] != 30 {
		t.Errorf("the burst got %v, want 30 answers", burst)
	}
	if e.upstream.Refused429() == 0 {
		t.Fatal("the burst met no 429 of the stand-in: nothing to learn from")
	}
	time.Sleep(1500 * time.Millisecond) // the key's lockout ends
	before := e.upstream.Refused429()

	// Both tiers backlogged: eight callers' workers each, back to back.
	const total = 60
	var (
		mu       sync.Mutex
		answered = map[string]int{}
		other    []string
	)
	for _, c := range []struct{ tier, key string }{{"pro", pro}, {"free", free}} {
		for range 8 {
			wg.Go(func() {
				for {
					mu.Lock()
					done := answered["pro"]+answered["free"]+len(other) >= total
					mu.Unlock()
					if done {
						return
					}
					res, err := rawChat(t.Context(), e, c.key, "vigthoria-fast-1", false)
					mu.Lock()
					switch {
					case err != nil:
						other = append(other, err.Error())
					case res.StatusCode == http.StatusOK:
						answered[c.tier]++
					default:
						b, _ := io.ReadAll(res.Body)
						other = append(other, res.Status+" "+string(b))
					}
					mu.Unlock()
					if res != nil {
						io.Copy(io.Discard, res.Body)
						res.Body.Close()
					}
				}
			})
		}
	}
	wg.Wait()
	if len(other) > 0 {
		t.Errorf("%d answers were not 200, first: %s", len(other), other[0])
	}
	if n := e.upstream.Refused429() - before; n > 2 {
		t.Errorf("the stand-in refused %d more requests with 429 once the pace was learned; want at most 2", n)
	}
	ratio := float64(answered["pro"]) / float64(max(answered["free"], 1))
	if ratio < 2 || ratio > 4.5 {
		t.Errorf("pro %d, free %d answered: ratio %.2f, want about 3 (weights 3 and 1)", answered["pro"], answered["free"], ratio)
	}
	t.Logf("pro %d, free %d; the stand-in's 429s: %d in the burst, %d after", answered["pro"], answered["free"], before, e.upstream.Refused429()-before)
}
