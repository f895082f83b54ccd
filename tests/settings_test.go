package tests

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	vigthoria "github.com/vigthoria/caddy-vigthoria"
)

// meteredTier is a tier whose every limit a key's settings override.
const meteredTier = "tier metered {\n\t\t\trequests 6000/1m\n\t\t\tmodels vigthoria-*\n\t\t\tmax_tokens 4096\n\t\t}"

// chatWith sends a chat completion with key, the extra body fields and
// headers, and returns the response.
func (e *env) chatWith(t *testing.T, key string, fields map[string]any, header http.Header) *http.Response {
	t.Helper()
	body := map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}
	for k, v := range fields {
		body[k] = v
	}
	h := http.Header{"Content-Type": {"application/json"}, "Authorization": {"Bearer " + key}}
	for k, v := range header {
		h[k] = v
	}
	return e.do(t, http.MethodPost, "/v1/chat/completions", jsonBody(body), h)
}

// TestKeySettings runs a key with its own settings through Caddy: its
// request limit replaces its tier's, and once cleared with the CLI the
// tier's applies within a second, without a reload; its models narrow
// the tier's, its max_tokens caps, and its origins bind it to its
// pages while servers (no Origin) still use it. key show reads the
// tier's values from the Caddyfile.
func TestKeySettings(t *testing.T) {
	e := start(t, manyFailures, meteredTier)
	id, key := e.addKey(t, "metered", "--requests", "2/1h", "--models", "vigthoria-fast-*", "--max-tokens", "100",
		"--origins", "https://app.acme.com,http://localhost:3000")
	e.waitKeysKnown(t)
	client := newClient(e.caddy.URL, key)

	for i := range 2 {
		if _, err := client.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
			t.Fatalf("request %d of the key's 2 an hour: %v", i+1, err)
		}
	}
	_, err := client.Chat.Completions.New(t.Context(), chatParams("one too many"))
	wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded")

	e.cli(t, "key", "update", id, "--clear-requests")
	eventually(t, "the tier's request limit applies", func() bool {
		_, err := client.Chat.Completions.New(t.Context(), chatParams("again"))
		return err == nil
	})
	for range 5 {
		if _, err := client.Chat.Completions.New(t.Context(), chatParams("more")); err != nil {
			t.Fatalf("under the tier's 6000 a minute: %v", err)
		}
	}

	// The key's models narrow the tier's vigthoria-*.
	wantAPIError(t, e.chatWith(t, key, map[string]any{"model": "vigthoria-pro-1"}, nil), http.StatusForbidden, "model_not_allowed")
	var models struct {
		Data []struct{ ID string } `json:"data"`
	}
	res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + key}})
	if err := json.NewDecoder(res.Body).Decode(&models); err != nil || len(models.Data) == 0 {
		t.Fatalf("GET /v1/models: %v %+v", err, models)
	}
	for _, m := range models.Data {
		if !strings.HasPrefix(m.ID, "vigthoria-fast-") {
			t.Errorf("GET /v1/models lists %s, which the key may not use", m.ID)
		}
	}

	// Its max_tokens caps the tier's 4096, and is what a request without
	// one gets.
	wantAPIError(t, e.chatWith(t, key, map[string]any{"max_tokens": 101}, nil), http.StatusBadRequest, "max_tokens_too_large")
	if res := e.chatWith(t, key, nil, nil); res.StatusCode != http.StatusOK {
		t.Fatalf("a chat without max_tokens: %d", res.StatusCode)
	}
	var sent struct {
		MaxCompletionTokens int64 `json:"max_completion_tokens"`
	}
	if err := json.Unmarshal(e.lastRequest(t).Body, &sent); err != nil || sent.MaxCompletionTokens != 100 {
		t.Errorf("the upstream got max_completion_tokens %d (%v), want the key's 100", sent.MaxCompletionTokens, err)
	}

	// Origins: another site's page is refused, the key's pages and
	// servers are not.
	res = e.chatWith(t, key, nil, http.Header{"Origin": {"https://evil.example"}})
	wantAPIError(t, res, http.StatusForbidden, "origin_not_allowed")
	for _, origin := range []string{"https://app.acme.com", "http://localhost:3000", ""} {
		h := http.Header{}
		if origin != "" {
			h.Set("Origin", origin)
		}
		if res := e.chatWith(t, key, nil, h); res.StatusCode != http.StatusOK {
			t.Errorf("Origin %q: %d, want 200", origin, res.StatusCode)
		}
	}
	// A key without origins is not bound to any.
	if res := e.chatWith(t, e.key, nil, http.Header{"Origin": {"https://evil.example"}}); res.StatusCode != http.StatusOK {
		t.Errorf("a key without origins, from another origin: %d, want 200", res.StatusCode)
	}

	// key show, with the Caddyfile: the tier's values where the key sets none.
	lines := []string{"store " + strings.Replace(e.store, ":", " ", 1), "tier free", "tier pro", manyFailures, meteredTier}
	caddyfile := filepath.Join(t.TempDir(), "Caddyfile")
	site := e.caddy.Caddyfile(vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...))
	if err := os.WriteFile(caddyfile, []byte(site), 0o600); err != nil {
		t.Fatal(err)
	}
	show := e.cli(t, "key", "show", id, "--config", caddyfile)
	for _, want := range []string{`requests\s+6000/1m\s+tier`, `models\s+vigthoria-fast-\*\s+key`, `max_tokens\s+100\s+key`,
		`origins\s+https://app.acme.com,http://localhost:3000\s+key`, `concurrent\s+none\s+tier`} {
		if !regexp.MustCompile(`(?m)^` + want + `$`).MatchString(show) {
			t.Errorf("key show printed %q, want a line %s", show, want)
		}
	}
	if secretPattern.MatchString(show) {
		t.Error("key show printed a secret")
	}

	// Cleared, the models and the cap follow the tier, and the tier's
	// changes, after a reload.
	e.cli(t, "key", "update", id, "--clear-models", "--clear-max-tokens")
	eventually(t, "the tier's models apply", func() bool {
		return e.chatWith(t, key, map[string]any{"model": "vigthoria-pro-1"}, nil).StatusCode == http.StatusOK
	})
	e.reload(t, manyFailures, strings.Replace(meteredTier, "max_tokens 4096", "max_tokens 50", 1))
	// A connection the old server accepted may close under the first
	// request after a reload: the client retries that.
	params := chatParams("long")
	params.MaxTokens = openai.Int(51)
	_, err = client.Chat.Completions.New(t.Context(), params, option.WithMaxRetries(2))
	wantOpenAIError(t, err, http.StatusBadRequest, "max_tokens_too_large")
}

// TestMintedUsersKeepTheirKeysOrigins: the origins of a key that mints
// tokens bind its users' requests too.
func TestMintedUsersKeepTheirKeysOrigins(t *testing.T) {
	e := start(t, manyFailures, "tier app", "tier web")
	keyID, backend := e.addKey(t, "app", "--mint", "web", "--origins", "https://app.acme.com")
	token := e.mintWhenKnown(t, backend, map[string]any{"user": "alice"})
	res := e.chatWith(t, token.Token, nil, http.Header{"Origin": {"https://evil.example"}})
	wantAPIError(t, res, http.StatusForbidden, "origin_not_allowed")
	if res := e.chatWith(t, token.Token, nil, http.Header{"Origin": {"https://app.acme.com"}}); res.StatusCode != http.StatusOK {
		t.Errorf("the key's origin: %d, want 200", res.StatusCode)
	}
	e.cli(t, "key", "update", keyID, "--clear-origins")
	eventually(t, "cleared origins reach the key's users", func() bool {
		return e.chatWith(t, token.Token, nil, http.Header{"Origin": {"https://evil.example"}}).StatusCode == http.StatusOK
	})
}

// TestFleetKeySettings: settings changed through one instance's admin
// API are honoured by the other within a second, and the key's own
// request limit is shared by both.
func TestFleetKeySettings(t *testing.T) {
	f := startFleet(t, "requests 100/1h")
	var out strings.Builder
	args := []string{"key", "add", "--tier", "metered", "--name", "acme", "--requests", "1/1h", "--store", f.redis.URL}
	if code := vigthoria.RunCLI(args, &out, &out); code != 0 {
		t.Fatalf("key add: %s", out.String())
	}
	secret := secretPattern.FindString(out.String())
	id := regexp.MustCompile(`key_[0-9A-Za-z]{16}`).FindString(out.String())
	eventually2s(t, "an instance accepts the new key", func() bool { return f.chat(t, f.a, secret) == http.StatusOK })
	var second int
	eventually2s(t, "the other instance knows the key", func() bool {
		second = f.chat(t, f.b, secret)
		return second != http.StatusUnauthorized
	})
	if second != http.StatusTooManyRequests {
		t.Fatalf("the key's second request an hour, on the other instance: %d, want 429", second)
	}
	req, _ := http.NewRequest(http.MethodPatch, f.a.AdminURL+"/vigthoria/keys/"+id, strings.NewReader(`{"requests":null}`))
	res, err := http.DefaultClient.Do(req)
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("PATCH on one instance: %v %v", err, res)
	}
	res.Body.Close()
	eventually(t, "the other instance applies the tier's limit", func() bool {
		return f.chat(t, f.b, secret) == http.StatusOK
	})
}

// TestBrowserKeyOrigins drives the demo page in headless Chromium from
// two origins that the site's cors list both allows, with a key bound to
// one of them: the page on that origin works, the page on the other gets
// the proxy's 403 origin_not_allowed, readable by its script, and
// nothing reaches the upstream.
func TestBrowserKeyOrigins(t *testing.T) {
	chromium := findChromium(t)
	allowed, allowedOrigin := pageServer()
	other, otherOrigin := pageServer()

	e := start(t, "cors "+allowedOrigin+" "+otherOrigin, browserTier)
	_, key := e.addKey(t, "browser", "--origins", allowedOrigin)
	e.waitKeysKnown(t)
	servePage(t, e, key, allowed, other)
	b := newBrowser(t, chromium)
	b.openWorking(allowedOrigin)
	calls := e.upstream.Count()
	b.send("Hello from the key's page")
	b.waitIdle()
	e.wantUpstreamCalls(t, calls+1)

	calls = e.upstream.Count()
	b.navigate(otherOrigin + "/")
	b.waitIdle()
	b.wantError("403", "origin_not_allowed")
	b.send("Hello from another page")
	b.waitIdle()
	b.wantError("403", "origin_not_allowed")
	if got := b.text("#usage-tier"); got != "–" {
		t.Errorf("on another origin the page shows tier %q, want none", got)
	}
	e.wantUpstreamCalls(t, calls)
}
