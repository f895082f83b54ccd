package tests

import (
	"net/http"
	"strings"
	"testing"
)

const appOrigin = "https://app.example.com"

func TestCORS(t *testing.T) {
	e := start(t, "cors "+appOrigin+" http://localhost:8081")
	e.upstream.Reset()

	t.Run("preflight answered here, not counted", func(t *testing.T) {
		res := e.do(t, http.MethodOptions, "/v1/chat/completions", nil, http.Header{
			"Authorization":                  nil,
			"Origin":                         {appOrigin},
			"Access-Control-Request-Method":  {"POST"},
			"Access-Control-Request-Headers": {"authorization, content-type"},
		})
		h := res.Header
		if res.StatusCode != http.StatusNoContent || h.Get("Access-Control-Allow-Origin") != appOrigin ||
			h.Get("Access-Control-Allow-Methods") != "POST" || !strings.Contains(strings.ToLower(h.Get("Access-Control-Allow-Headers")), "authorization") ||
			h.Get("Access-Control-Max-Age") == "" || !strings.Contains(strings.Join(h.Values("Vary"), ","), "Origin") {
			t.Errorf("preflight: %d %v", res.StatusCode, h)
		}
	})
	t.Run("preflight of an unknown path", func(t *testing.T) {
		res := e.do(t, http.MethodOptions, "/v1/files", nil, http.Header{
			"Authorization": nil, "Origin": {appOrigin}, "Access-Control-Request-Method": {"GET"},
		})
		wantAPIError(t, res, http.StatusNotFound, "unknown_url")
	})
	t.Run("answers carry the origin and expose the limit headers", func(t *testing.T) {
		res := e.do(t, http.MethodPost, "/v1/chat/completions",
			jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}),
			http.Header{"Origin": {appOrigin}, "Content-Type": {"application/json"}})
		exposed := res.Header.Get("Access-Control-Expose-Headers")
		if res.StatusCode != http.StatusOK || res.Header.Get("Access-Control-Allow-Origin") != appOrigin {
			t.Fatalf("status %d ACAO %q", res.StatusCode, res.Header.Get("Access-Control-Allow-Origin"))
		}
		for _, h := range []string{"X-Ratelimit-Remaining-Requests", "Retry-After", "X-Request-Id", "Ratelimit"} {
			if !strings.Contains(exposed, h) {
				t.Errorf("%s not exposed: %q", h, exposed)
			}
		}
		if n := len(res.Header.Values("Access-Control-Allow-Origin")); n != 1 {
			t.Errorf("%d Access-Control-Allow-Origin headers, want 1", n)
		}
	})
	t.Run("proxy errors carry them too", func(t *testing.T) {
		res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Origin": {appOrigin}, "Authorization": {"Bearer vgt_bad"}})
		if res.StatusCode != http.StatusUnauthorized || res.Header.Get("Access-Control-Allow-Origin") != appOrigin {
			t.Errorf("401: status %d ACAO %q", res.StatusCode, res.Header.Get("Access-Control-Allow-Origin"))
		}
	})
	t.Run("another origin is refused", func(t *testing.T) {
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader("{}"),
			http.Header{"Origin": {"https://evil.example"}})
		wantAPIError(t, res, http.StatusForbidden, "origin_not_allowed")
		if res.Header.Get("Access-Control-Allow-Origin") != "" {
			t.Error("a refused origin got Access-Control-Allow-Origin")
		}
	})
	t.Run("no Origin: servers and SDKs are unaffected", func(t *testing.T) {
		if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("server side")); err != nil {
			t.Error(err)
		}
	})
	if got := e.upstream.Count(); got != 2 {
		t.Errorf("upstream received %d requests, want the 2 real calls", got)
	}
}
