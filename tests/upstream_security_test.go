package tests

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// chatAs sends a small chat completion with key.
func (e *env) chatAs(t *testing.T, key string, header http.Header) *http.Response {
	t.Helper()
	h := http.Header{"Authorization": {"Bearer " + key}}
	for k, v := range header {
		h[k] = v
	}
	return e.do(t, http.MethodPost, "/v1/chat/completions",
		jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}), h)
}

// startWithKey is start, with one more key, of tier, in the store before
// Caddy starts, so that it is known from the first request on.
func startWithKey(t *testing.T, tier string, extra ...string) (*env, string) {
	t.Helper()
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	e := &env{upstream: up, server: srv}
	path := filepath.Join(t.TempDir(), "keys.db")
	e.store = "sqlite:" + path
	e.key = createKey(t, path, "pro")
	key := createKey(t, path, tier)
	lines := append([]string{"store sqlite " + path, "tier free", "tier pro"}, extra...)
	e.caddy = harness.StartCaddy(t, vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...))
	e.client = newClient(e.caddy.URL, e.key)
	return e, key
}

// chatWithin sends a small chat completion with key, waiting at most d
// for the answer's headers.
func chatWithin(e *env, key string, header http.Header, d time.Duration) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, e.caddy.URL+"/v1/chat/completions",
		jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}))
	req.Header.Set("Authorization", "Bearer "+key)
	for k, v := range header {
		req.Header[k] = v
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		return nil, err
	}
	body := res.Body
	res.Body = struct {
		io.Reader
		io.Closer
	}{body, closeFunc(func() error { defer cancel(); return body.Close() })}
	return res, nil
}

type closeFunc func() error

func (f closeFunc) Close() error { return f() }

// wantPassedError asserts res is the upstream's own error, passed on.
func wantPassedError(t *testing.T, res *http.Response, status int, code string) {
	t.Helper()
	var e apiError
	if err := json.NewDecoder(res.Body).Decode(&e); err != nil {
		t.Fatalf("status %d: body is not an error: %v", res.StatusCode, err)
	}
	if res.StatusCode != status || e.Error.Code != code {
		t.Errorf("got %d %q, want %d %q", res.StatusCode, e.Error.Code, status, code)
	}
}

// An upstream 429 about one request (too large for a minute's budget: no
// exhausted remaining count, Retry-After 60) goes back to its sender
// alone; every other key keeps being served. Before, it made every caller
// get upstream_rate_limited for the whole minute.
func TestPerRequest429DoesNotBlockOthers(t *testing.T) {
	e, sender := startWithKey(t, "metered", "retries 2 max_wait 10s", "tier metered {\n\t\t\trequests 5/1m\n\t\t}")
	other := e.key

	e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusTooManyRequests, FailCount: 1, RetryAfter: 60, FailRequestOnly: true})
	calls := e.upstream.Count()
	res := e.chatAs(t, sender, nil)
	wantPassedError(t, res, http.StatusTooManyRequests, "rate_limit_exceeded")
	if got := res.Header.Get("Retry-After"); got != "60" {
		t.Errorf("sender's Retry-After = %q, want the upstream's 60", got)
	}
	if n := e.upstream.Count() - calls; n != 1 {
		t.Errorf("upstream saw %d attempts of a per-request 429 with Retry-After past max_wait, want 1", n)
	}

	res = e.chatAs(t, other, nil)
	if res.StatusCode != http.StatusOK {
		t.Errorf("another key after one caller's per-request 429: status %d, blocked for %ss, want 200",
			res.StatusCode, res.Header.Get("Retry-After"))
	}

	// The sender's request was admitted and counts: 5 a minute, 1 spent
	// on the 429, 1 on this one.
	res = e.chatAs(t, sender, nil)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("sender's next request: status %d, want 200", res.StatusCode)
	}
	if got := res.Header.Get("X-Ratelimit-Remaining-Requests"); got != "3" {
		t.Errorf("sender's remaining requests = %q, want 3: the 429 counts against its own limit", got)
	}
}

// A 429 with evidence that the server key is spent (remaining 0) still
// stops every caller until the upstream's time.
func TestKeyExhausted429StillBlocksEveryone(t *testing.T) {
	e, sender := startWithKey(t, "metered", "retries 0", "tier metered {\n\t\t\trequests 5/1m\n\t\t}")
	e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusTooManyRequests, FailCount: 1, RetryAfter: 20})
	wantPassedError(t, e.chatAs(t, sender, nil), http.StatusTooManyRequests, "rate_limit_exceeded")
	calls := e.upstream.Count()
	res := e.chatAs(t, e.key, nil)
	wantAPIError(t, res, http.StatusTooManyRequests, "upstream_rate_limited")
	if ra := atoi(t, res.Header.Get("Retry-After")); ra < 19 || ra > 20 {
		t.Errorf("local Retry-After = %d, want what is left of the upstream's 20s", ra)
	}
	if e.upstream.Count() != calls {
		t.Error("the upstream was called while it said the key is spent")
	}
}

// smuggled are request headers that must never reach the upstream:
// credentials of every spelling, the caller's addresses, overrides of the
// method and URL the proxy checked, and upgrades.
var smuggled = http.Header{
	"X-Auth-Token":           {"tok-1"},
	"X-Access-Token":         {"tok-2"},
	"X-Amz-Security-Token":   {"tok-3"},
	"X-Client-Secret":        {"sec-4"},
	"Session-Token":          {"tok-5"},
	"X-Vigthoria-Key":        {"vk-6"},
	"X-Real-Ip":              {"203.0.113.7"},
	"True-Client-Ip":         {"203.0.113.8"},
	"X-Http-Method-Override": {"DELETE"},
	"X-Original-Url":         {"/v1/files"},
	"X-Rewrite-Url":          {"/v1/files"},
	"Connection":             {"Upgrade"},
	"Upgrade":                {"websocket"},
	"X-Forwarded-For":        {"203.0.113.9"},
	"X-Forwarded-Host":       {"evil.example"},
	"Forwarded":              {"for=203.0.113.10"},
	"Openai-Organization":    {"org-someone-else"},
	"X-Custom-Trace":         {"not on the list"},
	"X-Foo":                  {"only when configured"},
}

// allowed are request headers the SDKs send that do reach the upstream.
var allowed = http.Header{
	"X-Stainless-Lang":    {"go"},
	"Idempotency-Key":     {"idem-1"},
	"User-Agent":          {"OpenAI/Go 3.0.0"},
	"X-Client-Request-Id": {"req-client-1"},
	"Traceparent":         {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
	"Openai-Beta":         {"assistants=v2"},
}

func TestOnlyAllowedRequestHeadersReachUpstream(t *testing.T) {
	check := func(t *testing.T, e *env, pass ...string) {
		t.Helper()
		h := http.Header{}
		for k, v := range smuggled {
			h[k] = v
		}
		for k, v := range allowed {
			h[k] = v
		}
		res := e.chatAs(t, e.key, h)
		if res.StatusCode != http.StatusOK {
			t.Fatalf("status = %d, want 200", res.StatusCode)
		}
		got := e.lastRequest(t)
		e.wantNoClientSecrets(t, got)
		for name, v := range smuggled {
			if slices.Contains(pass, name) {
				if got.Header.Get(name) != v[0] {
					t.Errorf("configured %s did not reach the upstream: got %q", name, got.Header.Get(name))
				}
				continue
			}
			if vals := got.Header.Values(name); len(vals) > 0 {
				t.Errorf("upstream got %s: %q, want none", name, vals)
			}
		}
		for name, v := range allowed {
			if got.Header.Get(name) != v[0] {
				t.Errorf("upstream %s = %q, want the caller's %q", name, got.Header.Get(name), v[0])
			}
		}
		// Caddy's reverse_proxy adds these after every handler; the
		// transport is the last to see the request.
		for _, name := range []string{"X-Forwarded-Proto", "Via", "Sec-Websocket-Key"} {
			if vals := got.Header.Values(name); len(vals) > 0 {
				t.Errorf("upstream got %s: %q, want none", name, vals)
			}
		}
	}
	t.Run("built-in allowlist", func(t *testing.T) { check(t, start(t)) })
	t.Run("upstream_headers X-Foo", func(t *testing.T) { check(t, start(t, "upstream_headers X-Foo"), "X-Foo") })
}

// An upstream answering 1xx other than 100 (a protocol switch, an early
// hint) gets the caller a 502 in the API's shape, and its request ends:
// on a tier of one concurrent request, the next one is admitted.
func TestUpstreamInterimAnswerIs502AndFreesTheSlot(t *testing.T) {
	e, key := startWithKey(t, "one", "retries 0", "tier one {\n\t\t\tconcurrent 1\n\t\t}")
	for _, tc := range []struct {
		name   string
		status int
		header http.Header
	}{
		{"101 to a caller asking to upgrade", http.StatusSwitchingProtocols, http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}}},
		{"101 unasked", http.StatusSwitchingProtocols, nil},
		{"103 early hints", http.StatusEarlyHints, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.upstream.SetBehavior(standin.Behavior{Informational: tc.status})
			calls := e.upstream.Count()
			// Bounded: before, the caller of a switched request could
			// wait for an answer that never came.
			first := make(chan *http.Response, 1)
			go func() {
				res, err := chatWithin(e, key, tc.header, 5*time.Second)
				if err != nil {
					t.Errorf("no answer: %v", err)
				}
				first <- res
			}()
			eventually(t, "the upstream got the request", func() bool { return e.upstream.Count() > calls })
			// While the first request is still answered (or held), the
			// next one on this tier of 1 concurrent request.
			e.upstream.SetBehavior(standin.Behavior{})
			time.Sleep(200 * time.Millisecond)
			next, err := chatWithin(e, key, nil, 2*time.Second)
			switch {
			case err != nil:
				t.Errorf("next request on a tier of 1 concurrent: %v", err)
			case next.StatusCode != http.StatusOK:
				t.Errorf("next request on a tier of 1 concurrent: status %d, want 200 (the slot freed)", next.StatusCode)
			}
			if next != nil {
				next.Body.Close()
			}
			res := <-first
			if res == nil {
				return
			}
			defer res.Body.Close()
			if res.StatusCode != http.StatusBadGateway {
				t.Errorf("status = %d, want 502", res.StatusCode)
				return
			}
			if c := res.Header.Get("Set-Cookie"); c != "" {
				t.Errorf("the interim answer's Set-Cookie reached the caller: %q", c)
			}
			wantAPIError(t, res, http.StatusBadGateway, "upstream_bad_response")
		})
	}
}

// The upstream's cookies and account identifiers never reach the caller;
// its request ID, timing and rate-limit figures do.
func TestUpstreamAccountHeadersNeverReachCaller(t *testing.T) {
	e := start(t)
	e.upstream.SetBehavior(standin.Behavior{AccountHeaders: true})
	for _, path := range []string{"/v1/chat/completions", "/v1/models"} {
		var res *http.Response
		if path == "/v1/models" {
			res = e.do(t, http.MethodGet, path, nil, nil)
		} else {
			res = e.chatAs(t, e.key, nil)
		}
		if res.StatusCode != http.StatusOK {
			t.Fatalf("%s: status %d", path, res.StatusCode)
		}
		for _, name := range []string{"Set-Cookie", "Openai-Organization", "Openai-Project"} {
			if v := res.Header.Values(name); len(v) > 0 {
				t.Errorf("%s: caller got %s: %q", path, name, v)
			}
		}
		if path == "/v1/models" {
			continue // the proxy's own answer, from its cache
		}
		for _, name := range []string{"X-Request-Id", "Openai-Processing-Ms", "X-Ratelimit-Remaining"} {
			if res.Header.Get(name) == "" {
				t.Errorf("%s: %s missing from the answer", path, name)
			}
		}
	}
}

// Two sites (here two routes) with one upstream and a tier of one name but
// different models each see their own list: the cached, filtered list is
// keyed by the policy, not the tier's name.
func TestModelsCacheIsKeyedByPolicyNotTierName(t *testing.T) {
	up := standin.New(standin.Options{APIKey: serverKey})
	server := httptest.NewServer(up)
	t.Cleanup(server.Close)
	srv := server.URL
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	path := filepath.Join(t.TempDir(), "keys.db")
	key := createKey(t, path, "free")
	route := func(prefix, models string) string {
		return "\thandle_path " + prefix + "/* {\n\t\tvigthoria {\n" +
			"\t\t\tupstream " + srv + "/v1\n\t\t\tapi_key {env.VIGTHORIA_TEST_KEY}\n\t\t\tstore sqlite " + path + "\n" +
			"\t\t\ttier free {\n\t\t\t\tmodels " + models + "\n\t\t\t}\n\t\t}\n\t}"
	}
	c := harness.StartCaddy(t, route("/a", "vigthoria-fast-*")+"\n"+route("/b", "vigthoria-pro-*"))
	get := func(prefix string) []string {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, c.URL+prefix+"/v1/models", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		return modelIDs(t, res)
	}
	if got := get("/a"); !slices.Equal(got, []string{"vigthoria-fast-1"}) {
		t.Errorf("site a lists %v, want [vigthoria-fast-1]", got)
	}
	if got := get("/b"); !slices.Equal(got, []string{"vigthoria-pro-1"}) {
		t.Errorf("site b lists %v, want [vigthoria-pro-1]", got)
	}
}

// TestUpstreamErrorNamingTheKeyIsReplaced: an upstream 4xx in the API's
// error shape is passed on as it came, unless it names the server key
// (an upstream that quotes the request's Authorization header), as it
// is or escaped in a JSON string: then the caller gets the proxy's own
// error, with the same status.
func TestUpstreamErrorNamingTheKeyIsReplaced(t *testing.T) {
	e := start(t)
	escaped := strings.ReplaceAll(serverKey, "-", `\u002d`)
	for _, said := range []string{"Bearer " + serverKey, escaped} {
		e.upstream.SetBehavior(standin.Behavior{
			FailStatus: http.StatusBadRequest,
			FailBody:   `{"error":{"message":"Invalid request for key ` + said + `: unsupported parameter","type":"invalid_request_error","code":"unsupported_parameter"}}`,
		})
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(`{"model":"`+model+`","messages":[{"role":"user","content":"hi"}]}`),
			http.Header{"Content-Type": {"application/json"}})
		var got apiError
		body, _ := io.ReadAll(res.Body)
		if json.Unmarshal(body, &got) != nil || res.StatusCode != http.StatusBadRequest || got.Error.Code != "upstream_error" || strings.Contains(string(body), serverKey[len(serverKey)-8:]) {
			t.Errorf("an upstream 400 naming the server key (%q): %d %s, want 400 upstream_error without the key", said[:8], res.StatusCode, body)
		}
	}
	e.upstream.SetBehavior(standin.Behavior{
		FailStatus: http.StatusBadRequest,
		FailBody:   `{"error":{"message":"max_tokens is too large","type":"invalid_request_error","code":"invalid_value"}}`,
	})
	res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(`{"model":"`+model+`","messages":[{"role":"user","content":"hi"}]}`),
		http.Header{"Content-Type": {"application/json"}})
	if body, _ := io.ReadAll(res.Body); !strings.Contains(string(body), "max_tokens is too large") {
		t.Errorf("an upstream 400 that names no key: %d %s, want it passed on", res.StatusCode, body)
	}
}

// TestCredentialInAnAllowedHeaderStaysHere: a client key in a header
// that may go upstream (here User-Agent) is neither sent upstream nor
// printed by reverse_proxy's debug line, which prints the request it
// forwards: the header is removed.
func TestCredentialInAnAllowedHeaderStaysHere(t *testing.T) {
	e := start(t)
	other := createKey(t, strings.TrimPrefix(e.store, "sqlite:"), "pro")
	chat := `{"model":"` + model + `","messages":[{"role":"user","content":"hi"}]}`
	res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(chat), http.Header{
		"Content-Type": {"application/json"},
		"User-Agent":   {"myapp/1.0 " + other},
		"X-Probe":      {"ua"},
	})
	io.Copy(io.Discard, res.Body)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d", res.StatusCode)
	}
	if ua := e.lastRequest(t).Header.Get("User-Agent"); strings.Contains(ua, other) {
		t.Errorf("a client key reached the upstream in User-Agent: %q", ua)
	}
	e.caddy.WaitLog(t, `"X-Probe":["ua"]`)
	for l := range strings.Lines(e.caddy.ReadLog(t)) {
		if strings.Contains(l, other[len(other)-8:]) {
			t.Errorf("Caddy's log holds a client key: %.300s", l)
		}
	}
}
