package tests

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	vigthoria "github.com/vigthoria/caddy-vigthoria"
	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/limiter"
)

// fleet is two Caddy instances, one in this process and one in its own,
// sharing one Redis.
type fleet struct {
	a, b     *harness.Caddy
	redis    *redistest.Server
	upstream *standin.Server
	key      string // of tier "metered"
}

func startFleet(t *testing.T, limits ...string) *fleet {
	t.Helper()
	return startFleetWith(t, nil, limits...)
}

// startFleetWith is startFleet with more lines in the vigthoria block.
func startFleetWith(t *testing.T, lines []string, limits ...string) *fleet {
	t.Helper()
	f := &fleet{redis: redistest.StartWith(t, "--enable-debug-command", "yes"), upstream: standin.New(standin.Options{APIKey: serverKey})}
	srv := httptest.NewServer(f.upstream)
	t.Cleanup(srv.Close)
	st, err := redisstore.Open(f.redis.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, f.key, err = keystore.Create(t.Context(), st, keystore.Attrs{Name: "fleet", Tier: "metered"}, time.Now())
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	// A generous store_timeout, so that a slow test machine measures the
	// shared limits and not the fallback (TestFleetRedisOutage sets its own).
	timeout := "store_timeout 2s"
	if len(limits) > 0 && strings.HasPrefix(limits[0], "store_timeout") {
		timeout, limits = limits[0], limits[1:]
	}
	tier := "tier metered"
	if len(limits) > 0 {
		tier += " {\n\t\t\t" + strings.Join(limits, "\n\t\t\t") + "\n\t\t}"
	}
	site := vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", append([]string{"store redis " + f.redis.URL, manyFailures, timeout, tier}, lines...)...)
	f.a = harness.StartCaddy(t, site)
	f.b = harness.StartProcess(t, site)
	return f
}

// chat sends one chat completion to an instance and returns the status.
func (f *fleet) chat(t *testing.T, c *harness.Caddy, key string) int {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, c.URL+"/v1/chat/completions",
		jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}))
	req.Header.Set("Authorization", "Bearer "+key)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Errorf("chat: %v", err)
		return 0
	}
	res.Body.Close()
	return res.StatusCode
}

func TestFleetRequestLimitIsExactAcrossInstances(t *testing.T) {
	f := startFleet(t, "requests 100/1h burst 100") // an hour: no refill during the test
	var ok, refused atomic.Int64
	var wg sync.WaitGroup
	for g := range 20 {
		wg.Go(func() {
			for i := range 15 {
				c := f.a
				if (g+i)%2 == 1 {
					c = f.b
				}
				switch f.chat(t, c, f.key) {
				case http.StatusOK:
					ok.Add(1)
				case http.StatusTooManyRequests:
					refused.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if ok.Load() != 100 || refused.Load() != 200 {
		t.Errorf("admitted %d and refused %d of 300 across two instances, want exactly 100 and 200", ok.Load(), refused.Load())
	}
}

func TestFleetConcurrencyAndQuotaAreShared(t *testing.T) {
	f := startFleet(t, "concurrent 2", "quota 100000/day")
	f.upstream.SetBehavior(standin.Behavior{Latency: 2 * time.Second})
	var ok atomic.Int64
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Go(func() {
			c := f.a
			if i%2 == 1 {
				c = f.b
			}
			if f.chat(t, c, f.key) == http.StatusOK {
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	if ok.Load() != 2 {
		t.Errorf("%d requests ran at once across two instances, want the tier's 2", ok.Load())
	}

	// The quota one instance used shows on the other.
	f.upstream.SetBehavior(standin.Behavior{})
	e := &env{caddy: f.b}
	eventually(t, "the quota used through both is shared", func() bool {
		u, _ := e.usage(t, f.key)
		return u.Limits.Quota != nil && u.Limits.Quota.Used > 0
	})
	ua, _ := (&env{caddy: f.a}).usage(t, f.key)
	ub, _ := e.usage(t, f.key)
	if ua.Limits.Quota.Used != ub.Limits.Quota.Used {
		t.Errorf("quota used: %d on one instance, %d on the other", ua.Limits.Quota.Used, ub.Limits.Quota.Used)
	}
}

func TestFleetRevocationReachesEveryInstance(t *testing.T) {
	f := startFleet(t)
	var out strings.Builder
	if code := vigthoria.RunCLI([]string{"key", "add", "--tier", "metered", "--name", "temp", "--store", f.redis.URL}, &out, &out); code != 0 {
		t.Fatalf("key add: %s", out.String())
	}
	secret := secretPattern.FindString(out.String())
	id := strings.Fields(out.String()[strings.Index(out.String(), "key_"):])[0]
	eventually(t, "both instances accept the new key", func() bool {
		return f.chat(t, f.a, secret) == http.StatusOK && f.chat(t, f.b, secret) == http.StatusOK
	})
	req, _ := http.NewRequest(http.MethodDelete, f.a.AdminURL+"/vigthoria/keys/"+id, nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil || res.StatusCode >= 300 {
		t.Fatalf("revoking on one instance: %v %v", err, res)
	}
	res.Body.Close()
	eventually(t, "the other instance refuses the revoked key", func() bool {
		return f.chat(t, f.b, secret) == http.StatusUnauthorized
	})
}

func TestFleetRedisOutage(t *testing.T) {
	f := startFleet(t, "store_timeout 50ms", "requests 1000/1m")
	if s := f.chat(t, f.a, f.key); s != http.StatusOK {
		t.Fatalf("before the outage: %d", s)
	}
	// served sends chats to A until 3 are served, from A's share of the
	// requests the fleet's rate refills during the outage (500/1m each);
	// every answer is that or a 429 of the share, never a 503 or a hang.
	served := func(what string) {
		t.Helper()
		ok, refusal := 0, ""
		for i := 0; ok < 3; i++ {
			if i == 50 {
				t.Fatalf("%s: %d of 50 served, want 3; the last refusal: %s", what, ok, refusal)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, f.a.URL+"/v1/chat/completions",
				jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}))
			req.Header.Set("Authorization", "Bearer "+f.key)
			res, err := http.DefaultClient.Do(req)
			cancel()
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			switch res.StatusCode {
			case http.StatusOK:
				ok++
			case http.StatusTooManyRequests:
				refusal = string(body)
				time.Sleep(150 * time.Millisecond)
			default:
				t.Fatalf("%s: status %d, want 200 or 429 from the local limits", what, res.StatusCode)
			}
		}
	}

	f.redis.Pause(t)
	served("Redis stopped")
	if !f.a.WaitLog(t, "the shared limiter failed") {
		t.Error("the fallback to local limits was not logged")
	}
	f.redis.Resume(t)
	eventually2s(t, "Redis is used again", func() bool {
		f.chat(t, f.a, f.key)
		return strings.Contains(f.a.ReadLog(t), "the shared limiter answers again")
	})

	f.redis.Kill(t)
	served("Redis killed")
	// A Redis that comes back empty has lost the keys: the instances see
	// the reset and refuse them, rather than trust keys nobody can revoke.
	f.redis.Restart(t)
	eventually2s(t, "the emptied store's keys are refused", func() bool {
		return f.chat(t, f.a, f.key) == http.StatusUnauthorized
	})
}

// eventually2s is eventually with room for the limiter's probe interval.
func eventually2s(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitFor(t, 3*time.Second, what, cond)
}

func TestFleetSharesUpstreamExhaustion(t *testing.T) {
	f := startFleet(t, "store_timeout 2s", "requests 1000/1m")
	// Prime B's view of the fleet first, so that its next look is soon.
	f.chat(t, f.b, f.key)
	// One 429, to A only, saying the key is spent for 20s (past max_wait,
	// so A does not retry). B never hears it from the upstream itself.
	f.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusTooManyRequests, FailCount: 1, RetryAfter: 20})
	if s := f.chat(t, f.a, f.key); s != http.StatusTooManyRequests {
		t.Fatalf("A: status %d, want the upstream's 429", s)
	}
	eventually2s(t, "B answers from the fleet's word, without the upstream", func() bool {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, f.b.URL+"/v1/chat/completions",
			jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}))
		req.Header.Set("Authorization", "Bearer "+f.key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		defer res.Body.Close()
		var e apiError
		json.NewDecoder(res.Body).Decode(&e)
		return res.StatusCode == http.StatusTooManyRequests && e.Error.Code == "upstream_rate_limited"
	})
}

// TestFleetSlotsOutliveNeitherRequestNorInstance holds a request on one
// instance for longer than a lease lives, then kills that instance: the
// request keeps its slot while it runs, and the slot is free again within
// the lease TTL of the kill, not when a long TTL ends.
func TestFleetSlotsOutliveNeitherRequestNorInstance(t *testing.T) {
	f := startFleet(t, "concurrent 1")
	f.upstream.SetBehavior(standin.Behavior{Latency: 10 * time.Minute})
	held, cancel := context.WithCancel(t.Context())
	defer cancel()
	ended := make(chan string, 1) // how the held request ended, if it did
	go func() {
		req, _ := http.NewRequestWithContext(held, http.MethodPost, f.b.URL+"/v1/chat/completions",
			jsonBody(map[string]any{"model": model, "stream": true, "messages": []map[string]string{{"role": "user", "content": "hi"}}}))
		req.Header.Set("Authorization", "Bearer "+f.key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			ended <- err.Error()
			return
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		ended <- res.Status + " " + string(body)
	}()
	a := &env{caddy: f.a}
	inFlight := func() int {
		u, _ := a.usage(t, f.key)
		if u.Limits.Concurrent == nil {
			return -1
		}
		return u.Limits.Concurrent.InFlight
	}
	waitFor(t, 30*time.Second, "the held request reaches the upstream", func() bool {
		select {
		case how := <-ended:
			t.Fatalf("the held request ended before it was counted: %s", how)
		default:
		}
		return f.upstream.Active() == 1
	})

	time.Sleep(limiter.LeaseTTL + 3*time.Second)
	if n := inFlight(); n != 1 {
		t.Errorf("a request running past the lease TTL: %d in flight, want 1", n)
	}
	if s := f.chat(t, f.a, f.key); s != http.StatusTooManyRequests {
		t.Errorf("a second request beside it: %d, want 429", s)
	}

	f.upstream.SetBehavior(standin.Behavior{})
	if err := syscall.Kill(f.b.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	for f.chat(t, f.a, f.key) != http.StatusOK {
		if time.Since(killed) > limiter.LeaseTTL+10*time.Second {
			t.Fatalf("the killed instance's slot is still taken %v after the kill", time.Since(killed).Round(time.Second))
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("the killed instance's slot was free %v after the kill", time.Since(killed).Round(100*time.Millisecond))
}

// TestFleetQuotaDuringRedisOutage: with on_store_error local, a tier with
// a quota keeps being served while Redis is stopped or gone, and limited
// from what each instance knows: the last figure it saw from Redis plus
// what it served itself since. A client at 9,000 of 10,000 gets at most
// the 1,000 left from an instance, then 429 insufficient_quota.
// TestFleetQuotaDuringRedisOutage: a caller with 1,000 left of its
// quota, while Redis is stopped, then killed. Under on_store_error local,
// no instance can know what the others spent: the caller is refused (503)
// and the fleet spends nothing more. Under local_unshared, the operator's
// choice, each instance serves the rest it knows of: A what Redis last
// said was left, and after A's spend reached Redis, B the same, since B
// never heard of it.
func TestFleetQuotaDuringRedisOutage(t *testing.T) {
	for _, policy := range []string{"local", "local_unshared"} {
		t.Run(policy, func(t *testing.T) { quotaDuringOutage(t, policy) })
	}
}

func quotaDuringOutage(t *testing.T, policy string) {
	f := startFleetWith(t, []string{"on_store_error " + policy}, "store_timeout 250ms", "quota 10000/month")
	a, b := newClient(f.a.URL, f.key), newClient(f.b.URL, f.key)
	// chat asks for completion tokens (the prompt is 4 more) and returns
	// the tokens the answer used and how long it took.
	chat := func(c openai.Client, completion int64, raw **http.Response) (int64, time.Duration, error) {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		params := chatParams("hi")
		params.MaxTokens = openai.Int(completion)
		begin := time.Now()
		res, err := c.Chat.Completions.New(ctx, params, option.WithResponseInto(raw))
		if err != nil {
			return 0, time.Since(begin), err
		}
		return res.Usage.TotalTokens, time.Since(begin), nil
	}
	var raw *http.Response
	for i := range 9 {
		c := a
		if i%2 == 1 {
			c = b
		}
		if n, _, err := chat(c, 996, &raw); err != nil || n != 1000 {
			t.Fatalf("before the outage, request %d: %d tokens, %v", i+1, n, err)
		}
	}
	// Each instance sees the fleet's figure, here in /v1/usage.
	for _, c := range []*harness.Caddy{f.a, f.b} {
		e := &env{caddy: c}
		eventually(t, "9,000 used shows", func() bool {
			u, _ := e.usage(t, f.key)
			return u.Limits.Quota != nil && u.Limits.Quota.Used == 9000
		})
	}

	// drain sends requests of 100 tokens until one is refused, and
	// returns the tokens served.
	drain := func(what string, c openai.Client) int64 {
		t.Helper()
		var served int64
		var slowest time.Duration
		for i := 0; ; i++ {
			var raw *http.Response
			n, took, err := chat(c, 96, &raw)
			slowest = max(slowest, took)
			if err != nil && policy == "local" {
				wantOpenAIError(t, err, http.StatusServiceUnavailable, "proxy_unavailable")
				break
			}
			if err != nil && i == 0 {
				t.Fatalf("%s, first request: %v after %v, want an answer from the local limits", what, err, took.Round(time.Millisecond))
			}
			if err != nil {
				wantOpenAIError(t, err, http.StatusTooManyRequests, "insufficient_quota")
				break
			}
			if i == 0 {
				// The standing counts this request's reservation.
				if left := quotaRemaining(t, raw); left <= 0 || left >= 1000 {
					t.Errorf("%s, first answer: %d of the quota left, want less than the 1,000 left above 9,000", what, left)
				}
			}
			if served += n; i == 20 {
				t.Fatalf("%s: %d tokens served and no refusal", what, served)
			}
		}
		t.Logf("%s: %d tokens served, then refused; slowest answer %v", what, served, slowest.Round(time.Millisecond))
		if policy == "local" && served != 0 {
			t.Errorf("%s: %d tokens served above 9,000, want none: the instance cannot know what the others spent", what, served)
		}
		if policy == "local_unshared" && (served < 500 || served > 1000) {
			t.Errorf("%s: %d tokens served above 9,000, want most of the 1,000 left and no more", what, served)
		}
		return served
	}

	f.redis.Pause(t)
	drain("Redis stopped", a)
	f.redis.Resume(t)
	eventually2s(t, "Redis is used again", func() bool {
		// GET /v1/usage reads the quota's standing from Redis (a read
		// of the models asks Redis nothing where no limit bounds it).
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, f.a.URL+"/v1/usage", nil)
		req.Header.Set("Authorization", "Bearer "+f.key)
		if res, err := http.DefaultClient.Do(req); err == nil {
			res.Body.Close()
		}
		return strings.Contains(f.a.ReadLog(t), "the shared limiter answers again")
	})

	f.redis.Kill(t)
	// Redis never learnt what A served while it was stopped; A did.
	_, _, err := chat(a, 500, &raw)
	switch {
	case policy == "local":
		wantOpenAIError(t, err, http.StatusServiceUnavailable, "proxy_unavailable")
	case err == nil:
		t.Error("Redis killed, A: 500 more served, want 429: A served the quota's rest while Redis was stopped")
	default:
		wantOpenAIError(t, err, http.StatusTooManyRequests, "insufficient_quota")
	}
	drain("Redis killed, B", b)
}

// quotaRemaining reads the quota left from an answer's RateLimit field.
func quotaRemaining(t *testing.T, res *http.Response) int64 {
	t.Helper()
	m := regexp.MustCompile(`"quota";r=(\d+)`).FindStringSubmatch(res.Header.Get("RateLimit"))
	if m == nil {
		t.Fatalf("RateLimit %q: no quota item", res.Header.Get("RateLimit"))
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	return n
}
