package tests

import (
	"net/http"
	"strings"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// TestStandingIsReadableWhenSpent: a caller whose quota is spent, or the
// user of a token whose minting key's quota is, or whose requests are,
// still reads its own standing and the models it may use (200): reads
// count in a request bucket of their own, of the tier's size, and are
// never refused for a quota or budget.
func TestStandingIsReadableWhenSpent(t *testing.T) {
	e := start(t, manyFailures, testPrices,
		"tier spent {\n\t\t\trequests 6/1h\n\t\t\tquota 100/day\n\t\t\tbudget 0.001/day\n\t\t}",
		"tier app {\n\t\t\tquota 100/day\n\t\t}", "tier web", "tier busy {\n\t\t\trequests 3/1h\n\t\t}")
	_, key := e.addKey(t, "spent")
	_, backend := e.addKey(t, "app", "--mint", "web")
	e.waitKeysKnown(t)
	user := e.mintWhenKnown(t, backend, map[string]any{"user": "alice", "tier": "web"})
	// One answer spends the quota, and the budget, whole.
	e.upstream.SetBehavior(standin.Behavior{Usage: `{"prompt_tokens":60,"completion_tokens":60,"total_tokens":120}`})

	for _, caller := range []struct{ name, key string }{{"a key", key}, {"a minted token's user", user.Token}} {
		auth := http.Header{"Authorization": {"Bearer " + caller.key}}
		refused := false
		for range 20 {
			status, _, body := budgetChat(t, e.caddy.URL, caller.key, model)
			if status == http.StatusTooManyRequests && strings.Contains(body, "insufficient_quota") {
				refused = true
				break
			}
			if status != http.StatusOK {
				t.Fatalf("%s: a chat: %d %s", caller.name, status, body)
			}
		}
		if !refused {
			t.Fatalf("%s: the quota never refused", caller.name)
		}
		for _, path := range []string{"/v1/usage", "/v1/models"} {
			if res := e.do(t, http.MethodGet, path, nil, auth); res.StatusCode != http.StatusOK {
				t.Errorf("%s, its quota spent: GET %s: %d, want 200", caller.name, path, res.StatusCode)
			}
		}
	}

	// A caller out of requests reads its standing; reads are bounded by
	// a bucket of their own, 3 an hour here.
	_, busy := e.addKey(t, "busy")
	e.waitKeysKnown(t)
	e.upstream.SetBehavior(standin.Behavior{})
	for i := range 4 {
		status, _, body := budgetChat(t, e.caddy.URL, busy, model)
		if want := map[bool]int{true: http.StatusOK, false: http.StatusTooManyRequests}[i < 3]; status != want {
			t.Fatalf("chat %d of a tier of 3 requests an hour: %d %s", i+1, status, body)
		}
	}
	auth := http.Header{"Authorization": {"Bearer " + busy}}
	for _, path := range []string{"/v1/usage", "/v1/models", "/v1/usage"} {
		if res := e.do(t, http.MethodGet, path, nil, auth); res.StatusCode != http.StatusOK {
			t.Errorf("out of requests: GET %s: %d, want 200", path, res.StatusCode)
		}
	}
	wantAPIError(t, e.do(t, http.MethodGet, "/v1/usage", nil, auth), http.StatusTooManyRequests, "rate_limit_exceeded")
}
