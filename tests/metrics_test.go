package tests

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

func TestMetricsAndAccessLog(t *testing.T) {
	// Metrics live as long as the process: a tier of this test's own keeps
	// other tests' counts out of its figures.
	// 3 chats; the GET /v1/usage that finds the key accepted counts in a
	// bucket of its own.
	e := start(t, "tier counted {\n\t\t\trequests 3/1h\n\t\t}", "retries 1")
	path := strings.TrimPrefix(e.store, "sqlite:")
	key := createKey(t, path, "counted")
	client := newClient(e.caddy.URL, key)
	eventually(t, "the new key is accepted", func() bool {
		return e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer " + key}}).StatusCode == http.StatusOK
	})
	for range 4 { // the fourth is refused
		client.Chat.Completions.New(t.Context(), chatParams("count me"))
	}
	e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusServiceUnavailable, FailCount: 1})
	if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("retried")); err != nil {
		t.Fatalf("the retried request failed: %v", err)
	}
	e.do(t, http.MethodGet, "/v1/models", nil, nil)
	e.do(t, http.MethodGet, "/v1/models", nil, nil)

	// A request is counted as it settles, a moment after its answer.
	settled := func(t *testing.T, cond func() bool) {
		deadline := time.Now().Add(2 * time.Second)
		for !cond() && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
	}
	wants := []string{
		`vigthoria_requests_total{endpoint="chat_completions",outcome="ok",tier="counted"} 3`,
		`vigthoria_requests_total{endpoint="chat_completions",outcome="refused_rate_limit_exceeded",tier="counted"} 1`,
		`vigthoria_tokens_total{kind="completion",model="vigthoria-fast-1",tier="counted"}`,
		`vigthoria_models_cache_total{result="hit"}`,
		`vigthoria_models_cache_total{result="miss"}`,
		`vigthoria_upstream_retries_total`,
		`vigthoria_upstream_header_seconds_bucket{endpoint="chat_completions"`,
		`vigthoria_active_streams 0`,
	}
	var m string
	settled(t, func() bool {
		res, err := http.Get(e.caddy.AdminURL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		m = string(body)
		for _, want := range wants {
			if !strings.Contains(m, want) {
				return false
			}
		}
		return true
	})
	for _, want := range wants {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if regexp.MustCompile(`key_[0-9A-Za-z]{16}`).MatchString(m) || secretPattern.MatchString(m) {
		t.Error("a key ID or key appears in the metrics")
	}
	for _, want := range []string{`"vigthoria_decision":"admitted"`, `"vigthoria_tier":"counted"`, `"vigthoria_model":"vigthoria-fast-1"`,
		`"vigthoria_completion_tokens":16`, `"vigthoria_reason":"rate_limit_exceeded"`, `"vigthoria_retries":1`, `"vigthoria_cache":"HIT"`} {
		if !e.caddy.WaitLog(t, want) {
			t.Errorf("the access log lacks %s", want)
		}
	}
}
