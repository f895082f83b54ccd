package tests

import (
	"net/http"
	"strings"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// TestStandingIsReadableWhenSpent: a caller whose quota is spent, or the
// user of a token whose minting key's quota is, still reads its own
// standing and the models it may use (200), counted as requests under
// its request limit but never refused for its quota or budget.
func TestStandingIsReadableWhenSpent(t *testing.T) {
	e := start(t, manyFailures, testPrices,
		"tier spent {\n\t\t\trequests 6/1h\n\t\t\tquota 100/day\n\t\t\tbudget 0.001/day\n\t\t}",
		"tier app {\n\t\t\tquota 100/day\n\t\t}", "tier web")
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

	// Reading one's standing is bounded by the request limit: 6 an hour,
	// chats and reads together.
	auth := http.Header{"Authorization": {"Bearer " + key}}
	var last *http.Response
	for range 6 {
		if last = e.do(t, http.MethodGet, "/v1/usage", nil, auth); last.StatusCode != http.StatusOK {
			break
		}
	}
	wantAPIError(t, last, http.StatusTooManyRequests, "rate_limit_exceeded")
}
