package tests

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// TestRedisReloadLosesNoSettle reloads a Redis-backed config under load,
// each time to another store_timeout, so that each reload starts another
// Redis limiter and the old config's one closes once its requests ended:
// the settles it still held queued must land. Every answered chat's
// tokens count in the quota, exactly (a lost settle would leave its
// reservation there instead), and nothing stays in flight.
func TestRedisReloadLosesNoSettle(t *testing.T) {
	rs := redistest.Start(t)
	srv := httptest.NewServer(standin.New(standin.Options{APIKey: serverKey}))
	t.Cleanup(srv.Close)
	st, err := redisstore.Open(rs.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, key, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "reload", Tier: "metered"}, time.Now())
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	site := func(timeout string) string {
		return vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store redis "+rs.URL, manyFailures,
			"store_timeout "+timeout, "tier metered {\n\t\t\tconcurrent 1000\n\t\t\tquota 100000000/day\n\t\t}")
	}
	c := harness.StartCaddy(t, site("2s"))

	var answered, tokens, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, c.URL+"/v1/chat/completions",
					strings.NewReader(`{"model":"`+model+`","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}`))
				req.Header.Set("Authorization", "Bearer "+key)
				req.Header.Set("Content-Type", "application/json")
				res, err := client.Do(req)
				if err != nil {
					failed.Add(1)
					continue
				}
				body, _ := io.ReadAll(res.Body)
				res.Body.Close()
				var answer struct {
					Usage struct {
						TotalTokens int64 `json:"total_tokens"`
					} `json:"usage"`
				}
				if res.StatusCode != http.StatusOK || json.Unmarshal(body, &answer) != nil {
					t.Errorf("a chat: %d %s", res.StatusCode, body)
					continue
				}
				answered.Add(1)
				tokens.Add(answer.Usage.TotalTokens)
			}
		})
	}
	for i := range 4 {
		time.Sleep(300 * time.Millisecond)
		timeout := []string{"3s", "2s"}[i%2]
		if err := c.Load(site(timeout)); err != nil {
			t.Fatalf("reload: %v", err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	if answered.Load() < 50 {
		t.Fatalf("only %d chats answered", answered.Load())
	}

	e := &env{caddy: c}
	var u usageAnswer
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		u, _ = e.usage(t, key)
		if u.Limits.Quota != nil && u.Limits.Quota.Used == tokens.Load() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("quota used %+v, want the %d tokens of the %d chats answered (the ledger has %d; %d failed; in flight %+v)",
				u.Limits.Quota, tokens.Load(), answered.Load(), u.Today.TotalTokens, failed.Load(), u.Limits.Concurrent)
		}
	}
	if u.Limits.Concurrent == nil || u.Limits.Concurrent.InFlight != 0 {
		t.Errorf("after the load: %+v in flight, want none", u.Limits.Concurrent)
	}
	t.Logf("%d chats answered across 4 reloads (%d tokens), %d failed to connect", answered.Load(), tokens.Load(), failed.Load())
}
