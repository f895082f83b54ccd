package tests

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/hooktest"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"
)

// The pool's three keys: the stand-in accepts each as an account.
const (
	poolKey1 = "vig-pool-key-one-0123456789SECRET"
	poolKey2 = "vig-pool-key-two-0123456789SECRET"
	poolKey3 = "vig-pool-key-three-012345678SECRET"
)

// poolUpstream is a stand-in that accepts the pool's keys and counts
// requests by key.
func poolUpstream(t *testing.T) (*standin.Server, *httptest.Server) {
	t.Helper()
	up := standin.New(standin.Options{APIKey: poolKey1, Accounts: map[string][]string{poolKey2: nil, poolKey3: nil}, CountKeys: true})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	t.Setenv("VGT_POOL_K2", poolKey2)
	t.Setenv("VGT_POOL_K3", poolKey3)
	return up, srv
}

// poolBlock is the api_keys block of the tests: key 1 (api_key, weight
// 1), key 2 named name2 (weight 1), key 3 (weight 2).
func poolBlock(name2 string) string {
	return "api_keys {\n\t\t\t{env.VGT_POOL_K2} name " + name2 + "\n\t\t\t{env.VGT_POOL_K3} name " + name2 + "-heavy weight 2\n\t\t\tprobe_every 1s\n\t\t}"
}

// chatsWith counts the chat completions the stand-in got with key: the
// prober's GET /models with a refused key are not requests of callers.
func chatsWith(up *standin.Server, key string) int {
	n := 0
	for _, r := range up.Requests() {
		if strings.HasSuffix(r.Path, "/chat/completions") && r.Header.Get("Authorization") == "Bearer "+key {
			n++
		}
	}
	return n
}

// metricsOf returns the text of an instance's /metrics.
func metricsOf(t *testing.T, c *harness.Caddy) string {
	t.Helper()
	res, err := http.Get(c.AdminURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	return string(body)
}

func TestPoolSpreadsRevokesAndRestores(t *testing.T) {
	up, srv := poolUpstream(t)
	t.Setenv("VGT_POOL_K1", poolKey1)
	hooks := hooktest.New(t, hooktest.Secret)
	e := newEnv(t, up, srv)
	e.startCaddy(t, srv.URL+"/v1", "{env.VGT_POOL_K1}", poolBlock("pool-two"), alertsBlock(t, hooks.URL))

	chat := func(n int) {
		t.Helper()
		for i := range n {
			_, err := e.client.Chat.Completions.New(t.Context(), chatParams("hi"))
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
		}
	}
	// Spread by weight: 1, 1, 2 of 400 (the stand-in's advertised window
	// is large, so each key's learned room stays near full).
	chat(400)
	c1, c2, c3 := up.KeyCount(poolKey1), up.KeyCount(poolKey2), up.KeyCount(poolKey3)
	t.Logf("requests by key: %d, %d, %d", c1, c2, c3)
	for _, c := range []struct {
		name      string
		got, want int
	}{{"key 1", c1, 100}, {"key 2", c2, 100}, {"key 3", c3, 200}} {
		if c.got < c.want*9/10 || c.got > c.want*11/10 {
			t.Errorf("%s got %d of 400 requests, want %d ± 10%%", c.name, c.got, c.want)
		}
	}

	// Revoked mid-run: no caller sees an error, the key gets exactly one
	// more request, and the metric says it is out.
	refusalsBefore := seriesValue(metricsOf(t, e.caddy), `vigthoria_upstream_key_refusals_total{key="pool-two"}`)
	up.Revoke(poolKey2)
	chat(60)
	if got := chatsWith(up, poolKey2) - c2; got != 1 {
		t.Errorf("the revoked key got %d requests after its revocation, want exactly 1", got)
	}
	if m := metricsOf(t, e.caddy); !strings.Contains(m, `vigthoria_upstream_key_up{key="pool-two"} 0`) ||
		seriesValue(m, `vigthoria_upstream_key_refusals_total{key="pool-two"}`) != refusalsBefore+1 {
		t.Errorf("metrics do not show key pool-two down after one refusal:\n%s", grepLines(m, "upstream_key"))
	}
	if strings.Contains(metricsOf(t, e.caddy), "SECRET") {
		t.Error("a server key is in the metrics")
	}
	// The alerts webhook says so, naming the key, never giving it.
	if b := hooks.WaitAccepted(1, 10*time.Second); len(b) != 1 || b[0].Type != "upstream_key" || b[0].Key != "pool-two" || b[0].State != "disabled" || b[0].Status != 401 {
		t.Errorf("webhooks %+v, want upstream_key pool-two disabled 401", b)
	}

	// Restored: back after a probe (probe_every 1s), then used again.
	up.Restore(poolKey2)
	waitFor(t, 30*time.Second, "key pool-two back in the pool", func() bool {
		return strings.Contains(metricsOf(t, e.caddy), `vigthoria_upstream_key_up{key="pool-two"} 1`)
	})
	if b := hooks.WaitAccepted(2, 10*time.Second); len(b) != 2 || b[1].Key != "pool-two" || b[1].State != "enabled" || b[1].Status != 200 {
		t.Errorf("webhooks %+v, want the second upstream_key pool-two enabled 200", b)
	}
	before := up.KeyCount(poolKey2)
	chat(40)
	if got := up.KeyCount(poolKey2) - before; got < 5 {
		t.Errorf("the restored key got %d of 40 requests, want about 10", got)
	}
	if logs := e.caddy.ReadLog(t); strings.Contains(logs, "SECRET") {
		t.Error("a server key is in Caddy's log")
	}
}

// seriesValue reads the value of a series of a /metrics text, 0 when
// absent (metrics are the process's, and run on across tests).
func seriesValue(m, series string) float64 {
	for line := range strings.SplitSeq(m, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for line := range strings.SplitSeq(s, "\n") {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

func TestPoolFleetSharesARefusedKey(t *testing.T) {
	rs := redistest.Start(t)
	up, srv := poolUpstream(t)
	t.Setenv("VGT_POOL_K1", poolKey1)
	st, err := redisstore.Open(rs.URL)
	if err != nil {
		t.Fatal(err)
	}
	_, key, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "fleet", Tier: "pro"}, time.Now())
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	site := vigthoriaBlock(srv.URL+"/v1", "{env.VGT_POOL_K1}", "store redis "+rs.URL, manyFailures, "store_timeout 2s", "tier pro", poolBlock("fleet-two"))
	a := harness.StartCaddy(t, site)
	b := harness.StartProcess(t, site)
	send := func(c *harness.Caddy, body string) int {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, c.URL+"/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/json")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("chat: %v", err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	const good = `{"model":"` + model + `","messages":[{"role":"user","content":"hi"}]}`

	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("a's log:\n%s\nb's log:\n%s", grepLines(a.ReadLog(t), "http.handlers.vigthoria"), grepLines(b.ReadLog(t), "http.handlers.vigthoria"))
		}
	})
	up.Revoke(poolKey2)
	// a meets the refused key within a few requests (it is one of four
	// shares); no caller sees it.
	for i := 0; chatsWith(up, poolKey2) == 0; i++ {
		if i == 20 {
			t.Fatal("instance a never sent the refused key")
		}
		if s := send(a, good); s != http.StatusOK {
			t.Fatalf("a: status %d, want 200", s)
		}
	}
	// b learns from the fleet: requests that stop before the upstream
	// (a body that is not JSON) make it look, within its fetch interval.
	waitFor(t, 30*time.Second, "instance b to take the key out", func() bool {
		if s := send(b, `{not json`); s != http.StatusBadRequest {
			t.Fatalf("b: a bad body got %d, want 400", s)
		}
		if strings.Contains(metricsOf(t, b), `vigthoria_upstream_key_up{key="fleet-two"} 0`) {
			return true
		}
		return false
	})
	for range 20 {
		if s := send(b, good); s != http.StatusOK {
			t.Fatalf("b: status %d, want 200", s)
		}
	}
	if got := chatsWith(up, poolKey2); got != 1 {
		t.Errorf("the refused key got %d chat requests from the fleet, want exactly 1 (a's)", got)
	}
	if m := metricsOf(t, b); seriesValue(m, `vigthoria_upstream_key_refusals_total{key="fleet-two"}`) != 0 {
		t.Errorf("instance b met the refusal itself, want it told by the fleet:\n%s", grepLines(m, "upstream_key"))
	}
}

func TestPoolModelNoKeyServes(t *testing.T) {
	up, srv := poolUpstream(t)
	e := newEnv(t, up, srv)
	lines := []string{
		"upstream " + srv.URL + "/v1",
		"default_max_tokens " + strconv.Itoa(standin.DefaultMaxTokens),
		"store " + strings.Replace(e.store, ":", " ", 1), "tier pro",
		"api_keys {\n\t\t\t{env.VGT_POOL_K2} name fast-only models vigthoria-fast-*\n\t\t}",
	}
	e.caddy = harness.StartCaddy(t, "\tvigthoria {\n\t\t"+strings.Join(lines, "\n\t\t")+"\n\t}")
	e.client = newClient(e.caddy.URL, e.key)
	if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
		t.Fatalf("a model the key serves: %v", err)
	}
	params := chatParams("hi")
	params.Model = "vigthoria-pro-1"
	_, err := e.client.Chat.Completions.New(t.Context(), params)
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound || apiErr.Code != "model_not_available" {
		t.Fatalf("a model no key serves: got %v, want 404 model_not_available", err)
	}
	if n := chatsWith(up, poolKey2); n != 1 {
		t.Errorf("the upstream got %d chat requests, want 1: the unserved model never goes upstream", n)
	}
}

// projectModel403 is OpenAI's answer to a request for a model the key's
// project may not use: a 403 about the request's model, not about the
// key, which serves every other model.
const projectModel403 = `{"error":{"message":"Project ` + "`proj_abc`" + ` does not have access to model ` +
	"`vigthoria-pro-1`" + `","type":"invalid_request_error","param":null,"code":"model_not_found"}}`

// TestPoolKeepsKeysARequestWasRefusedWith: one caller's request for a
// model the upstream refuses every key (403, as OpenAI does for a model
// the project may not use) takes no key out of the pool: each key still
// answers the probe's request, so the refusal is the request's. Its
// caller gets 403, nothing of the upstream's body; every other caller is
// served. Before, each key was taken out in turn, and every caller of the
// site got 502 until a probe passed, which the one caller could repeat.
func TestPoolKeepsKeysARequestWasRefusedWith(t *testing.T) {
	up, srv := poolUpstream(t)
	t.Setenv("VGT_POOL_K1", poolKey1)
	e := newEnv(t, up, srv)
	other := createKey(t, strings.TrimPrefix(e.store, "sqlite:"), "pro")
	e.startCaddy(t, srv.URL+"/v1", "{env.VGT_POOL_K1}",
		"api_keys {\n\t\t\t{env.VGT_POOL_K2} name two\n\t\t\t{env.VGT_POOL_K3} name three\n\t\t}")
	up.SetBehavior(standin.Behavior{ForModel: "vigthoria-pro-1", FailStatus: http.StatusForbidden, FailBody: projectModel403})

	params := chatParams("hi")
	params.Model = "vigthoria-pro-1"
	_, err := e.client.Chat.Completions.New(t.Context(), params, option.WithMaxRetries(0))
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusForbidden || apiErr.Code != "upstream_error" || strings.Contains(apiErr.Message, "proj_abc") {
		t.Fatalf("a model every key's project refuses: %v, want 403 upstream_error without the upstream's words", err)
	}
	for _, k := range []string{poolKey1, poolKey2, poolKey3} {
		if n := chatsWith(up, k); n != 1 {
			t.Errorf("a key got %d of the refused request's attempts, want 1 each", n)
		}
	}
	victim := newClient(e.caddy.URL, other)
	for i := range 3 {
		if _, err := victim.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
			t.Fatalf("another caller's request %d, after one caller's request every key's project refused: %v", i, err)
		}
	}
	m := metricsOf(t, e.caddy)
	for _, name := range []string{"two", "three"} {
		if n := seriesValue(m, `vigthoria_upstream_key_refusals_total{key="`+name+`"}`); n != 0 {
			t.Errorf("key %s counted %v refusals, want none:\n%s", name, n, grepLines(m, "upstream_key"))
		}
	}
}
