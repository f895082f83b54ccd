package tests

import (
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
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
	// The model list first: its models are labels (with the configured
	// ones), and no other.
	e.do(t, http.MethodGet, "/v1/models", nil, nil)
	e.do(t, http.MethodGet, "/v1/models", nil, nil)
	for range 4 { // the fourth is refused
		client.Chat.Completions.New(t.Context(), chatParams("count me"))
	}
	e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusServiceUnavailable, FailCount: 1})
	if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("retried")); err != nil {
		t.Fatalf("the retried request failed: %v", err)
	}

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

// TestCallersDoNotChooseModelLabels sends a burst of chats with made-up
// model names (which the upstream serves, unlisted), then chats with
// models the operator wrote out in a tier and one the upstream lists:
// only those are labels of tokens_total; the made-up names are "other".
func TestCallersDoNotChooseModelLabels(t *testing.T) {
	// Metrics live as long as the process: names of this run's own.
	run := strings.ToLower(rand.Text()[:6])
	junk := make([]string, 120)
	for i := range junk {
		junk[i] = fmt.Sprintf("junk-%s-%d", run, i)
	}
	preview := "vigthoria-preview-" + run
	up := standin.New(standin.Options{APIKey: serverKey, Unlisted: append(junk, preview)})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := newEnv(t, up, srv)
	key := createKey(t, strings.TrimPrefix(e.store, "sqlite:"), "labels")
	e.startCaddy(t, srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}",
		"tier labels {\n\t\t\tmodels vigthoria-fast-* vigthoria-pro-1 "+preview+" junk-*\n\t\t}")
	client := newClient(e.caddy.URL, key)
	chat := func(model string) {
		t.Helper()
		p := chatParams("label me")
		p.Model = model
		if _, err := client.Chat.Completions.New(t.Context(), p); err != nil {
			t.Fatalf("chat with %s: %v", model, err)
		}
	}
	eventually(t, "the new key is accepted", func() bool {
		return e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer " + key}}).StatusCode == http.StatusOK
	})
	for _, m := range junk {
		chat(m)
	}
	if res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + key}}); res.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/models: %d", res.StatusCode)
	}
	for _, m := range []string{"vigthoria-pro-1", preview, "vigthoria-fast-1"} {
		chat(m)
	}

	wants := []string{
		`vigthoria_tokens_total{kind="completion",model="vigthoria-pro-1",tier="labels"} 16`,
		`vigthoria_tokens_total{kind="completion",model="` + preview + `",tier="labels"} 16`,
		`vigthoria_tokens_total{kind="completion",model="vigthoria-fast-1",tier="labels"} 16`,
		`vigthoria_tokens_total{kind="completion",model="other",tier="labels"} 1920`,
	}
	// A request is counted as it settles, a moment after its answer.
	var m string
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		res, err := http.Get(e.caddy.AdminURL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if m = string(body); strings.Contains(m, wants[2]) {
			break
		}
	}
	for _, want := range wants {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if n := strings.Count(m, "junk-"+run); n > 0 {
		t.Errorf("%d series of the metrics are labelled with a made-up model", n)
	}
}
