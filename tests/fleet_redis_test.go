package tests

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"github.com/redis/go-redis/v9"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
)

// Issue 26, class 3: a slow Redis, or one caller's burst, never turns a
// fleet's limits into N×, and never changes how other callers are
// decided. Each test runs two instances on one redis-server, one caller's
// burst of 200–300 parallel requests beside unrelated callers, and
// asserts counts, never durations.

// fleetKeys creates n keys of tier in the fleet's store and returns their
// secrets and how many chats each had answered while both instances
// learnt of it.
func fleetKeys(t *testing.T, f *fleet, tier string, n int) (secrets []string, answered []int) {
	t.Helper()
	st, err := redisstore.Open(f.redis.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for i := range n {
		_, secret, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "k" + strconv.Itoa(i), Tier: tier}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, secret)
	}
	answered = make([]int, n)
	for i, k := range secrets {
		eventually(t, "both instances accept a new key", func() bool {
			a, _ := chatTokens(t, f.a, k)
			b, _ := chatTokens(t, f.b, k)
			for _, code := range []int{a, b} {
				if code == http.StatusOK {
					answered[i]++
				}
			}
			return a != http.StatusUnauthorized && b != http.StatusUnauthorized
		})
	}
	return secrets, answered
}

// logErrors returns the messages both instances logged at error level,
// counted: what made their 503s.
func (f *fleet) logErrors(t *testing.T) map[string]int {
	out := make(map[string]int)
	for _, c := range []*harness.Caddy{f.a, f.b} {
		for _, line := range strings.Split(c.ReadLog(t), "\n") {
			var l struct{ Level, Msg, Error string }
			if json.Unmarshal([]byte(line), &l) == nil && l.Level == "error" {
				out[l.Msg+": "+l.Error]++
			}
		}
	}
	return out
}

// chatTokens sends one small chat and returns its status and the tokens
// the answer reports.
func chatTokens(t *testing.T, c *harness.Caddy, key string) (int, int64) {
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, c.URL+"/v1/chat/completions",
		strings.NewReader(`{"model":"`+model+`","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Errorf("chat: %v", err)
		return 0, 0
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	var answer struct {
		Usage struct {
			TotalTokens int64 `json:"total_tokens"`
		} `json:"usage"`
	}
	json.Unmarshal(body, &answer)
	return res.StatusCode, answer.Usage.TotalTokens
}

// statuses counts answers by status.
type statuses struct {
	mu sync.Mutex
	n  map[int]int
}

func (s *statuses) add(code int) {
	s.mu.Lock()
	if s.n == nil {
		s.n = make(map[int]int)
	}
	s.n[code]++
	s.mu.Unlock()
}

func (s *statuses) get(code int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n[code]
}

// burst sends n chats of key at once, spread over both instances, and
// returns their statuses and the tokens answered.
func (f *fleet) burst(t *testing.T, key string, n int) (*statuses, int64) {
	var s statuses
	var tokens atomic.Int64
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			c := f.a
			if i%2 == 1 {
				c = f.b
			}
			code, used := chatTokens(t, c, key)
			s.add(code)
			if code == http.StatusOK {
				tokens.Add(used)
			}
		})
	}
	wg.Wait()
	return &s, tokens.Load()
}

// others has each key send rounds chats one after another, all keys at
// once, while during runs; it returns their statuses.
func (f *fleet) others(t *testing.T, keys []string, rounds int) *statuses {
	var s statuses
	var wg sync.WaitGroup
	for k, key := range keys {
		wg.Go(func() {
			for i := range rounds {
				c := f.a
				if (k+i)%2 == 1 {
					c = f.b
				}
				code, _ := chatTokens(t, c, key)
				s.add(code)
			}
		})
	}
	wg.Wait()
	return &s
}

// sleepRedis makes Redis answer nothing for d, from another connection.
func (f *fleet) sleepRedis(t *testing.T, d time.Duration) {
	c := redis.NewClient(&redis.Options{Addr: f.redis.Addr})
	defer c.Close()
	if err := c.Do(context.Background(), "DEBUG", "SLEEP", strconv.FormatFloat(d.Seconds(), 'f', 3, 64)).Err(); err != nil {
		t.Errorf("DEBUG SLEEP: %v", err)
	}
}

// TestFleetBurstLeavesOthersAlone: with the default store_timeout of
// 50ms and on_store_error deny, one caller's burst of 300 parallel
// requests, with Redis healthy, never gets another caller a 503.
func TestFleetBurstLeavesOthersAlone(t *testing.T) {
	f := startFleetWith(t, []string{"on_store_error deny"}, "store_timeout 50ms", "requests 100000/1m")
	keys, _ := fleetKeys(t, f, "metered", 16)
	var burstS *statuses
	var others *statuses
	var wg sync.WaitGroup
	wg.Go(func() {
		for range 3 {
			s, _ := f.burst(t, f.key, 300)
			if burstS == nil {
				burstS = s
			} else {
				for code, n := range s.n {
					burstS.n[code] += n
				}
			}
		}
	})
	wg.Go(func() { others = f.others(t, keys, 25) })
	wg.Wait()
	t.Logf("the burst: %v; 16 others, 25 each: %v", burstS.n, others.n)
	if n := others.get(http.StatusOK); n != 16*25 {
		t.Errorf("the others: %d of %d answered (%v), want all: the burst is not an outage; logged: %v", n, 16*25, others.n, f.logErrors(t))
	}
}

// TestFleetSlowRedisNeverOverAdmits: Redis sleeps in the middle of
// bursts of 30 parallel requests of callers on requests 5/1m, under
// on_store_error local: 150ms (slow: the answers are waited for) and 1.5s
// (down: each instance decides with its share of what refills meanwhile).
// However each request is decided, the fleet admits no caller more than 5.
func TestFleetSlowRedisNeverOverAdmits(t *testing.T) {
	f := startFleetWith(t, []string{"on_store_error local"}, "store_timeout 50ms", "requests 5/1m")
	for _, sleep := range []time.Duration{150 * time.Millisecond, 1500 * time.Millisecond} {
		keys, before := fleetKeys(t, f, "metered", 4)
		var wg sync.WaitGroup
		results := make([]*statuses, len(keys))
		for i, k := range keys {
			wg.Go(func() { results[i], _ = f.burst(t, k, 30) })
		}
		wg.Go(func() { f.sleepRedis(t, sleep) })
		wg.Wait()
		for i, s := range results {
			if n := before[i] + s.get(http.StatusOK); n > 5 {
				t.Errorf("Redis asleep %v, caller %d: %d admitted in all (%d before the burst), want at most 5 (%v)", sleep, i, n, before[i], s.n)
			}
			t.Logf("Redis asleep %v, caller %d: %d before, then %v", sleep, i, before[i], s.n)
		}
	}
}

// TestFleetRefusalLeavesNothingCharged: under on_store_error deny, a
// request refused because Redis stalled (1.5s, past the probe) leaves
// nothing charged in the quota, not even what its lost calls reserved:
// the quota counter ends at exactly the tokens answered.
func TestFleetRefusalLeavesNothingCharged(t *testing.T) {
	f := startFleetWith(t, []string{"on_store_error deny"}, "store_timeout 50ms", "quota 10000000/day")
	var wg sync.WaitGroup
	var s *statuses
	var tokens int64
	wg.Go(func() { s, tokens = f.burst(t, f.key, 200) })
	wg.Go(func() {
		time.Sleep(20 * time.Millisecond)
		f.sleepRedis(t, 1500*time.Millisecond)
	})
	wg.Wait()
	e := &env{caddy: f.a}
	var used int64
	// Until its probe finds Redis again, the instance refuses under deny.
	waitFor(t, 5*time.Second, "the quota counts the tokens answered", func() bool {
		u, _, err := e.tryUsage(t, f.key)
		if err != nil || u.Limits.Quota == nil {
			return false // refused while its probe has not found Redis yet
		}
		used = u.Limits.Quota.Used
		return used == tokens
	})
	t.Logf("200 at once, Redis asleep 1.5s: %v; %d tokens answered, quota at %d", s.n, tokens, used)
}

// TestFleetScriptFlushEatsNoDeadline: after SCRIPT FLUSH (as after a Redis
// restart), 40 parallel requests under deny load the scripts again
// without a 503.
func TestFleetScriptFlushEatsNoDeadline(t *testing.T) {
	f := startFleetWith(t, []string{"on_store_error deny"}, "store_timeout 50ms", "requests 100000/1m", "quota 10000000/day")
	chatTokens(t, f.a, f.key)
	chatTokens(t, f.b, f.key)
	c := redis.NewClient(&redis.Options{Addr: f.redis.Addr})
	defer c.Close()
	for round := range 3 {
		if err := c.ScriptFlush(t.Context()).Err(); err != nil {
			t.Fatal(err)
		}
		s, _ := f.burst(t, f.key, 40)
		if n := s.get(http.StatusOK); n != 40 {
			t.Errorf("round %d after SCRIPT FLUSH: %d of 40 answered (%v), want all", round, n, s.n)
		}
	}
}
