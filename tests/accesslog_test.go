package tests

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// accessLine is what a test reads of an access log line.
type accessLine struct {
	Logger  string `json:"logger"`
	Msg     string `json:"msg"`
	Status  int    `json:"status"`
	Size    int    `json:"size"`
	UserID  string `json:"user_id"`
	Tier    string `json:"vigthoria_tier"`
	Request struct {
		URI     string              `json:"uri"`
		Headers map[string][]string `json:"headers"`
	} `json:"request"`
	Duration *float64 `json:"duration"`
}

// accessLines are the access log lines in log, by their X-Probe header.
func accessLines(t *testing.T, log string) map[string][]accessLine {
	t.Helper()
	lines := make(map[string][]accessLine)
	for raw := range strings.Lines(log) {
		var l accessLine
		if json.Unmarshal([]byte(raw), &l) != nil || l.Msg != "handled request" || !strings.HasPrefix(l.Logger, "http.log.access") {
			continue
		}
		if p := l.Request.Headers["X-Probe"]; len(p) == 1 {
			lines[p[0]] = append(lines[p[0]], l)
		}
	}
	return lines
}

// TestEveryRequestIsInTheAccessLog sends requests with client keys and
// tokens (real and made-up) in headers of every kind, the path and the
// query, each marked with an X-Probe header: each is in the access log
// once, with its status, size, duration and, once identified, its
// caller; no key or token is anywhere in the log. With log_credentials,
// the client keys in Authorization are redacted as well.
func TestEveryRequestIsInTheAccessLog(t *testing.T) {
	t.Run("default", func(t *testing.T) { testAccessLog(t, "") })
	t.Run("log_credentials", func(t *testing.T) { testAccessLog(t, "\tservers {\n\t\tlog_credentials\n\t}") })
}

func testAccessLog(t *testing.T, global string) {
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := newEnv(t, up, srv)
	e.caddy = harness.StartCaddy(t, vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}",
		"store "+strings.Replace(e.store, ":", " ", 1), "tier pro", manyFailures), harness.Global(global))
	eventually(t, "the key is accepted", func() bool {
		return e.do(t, http.MethodGet, "/v1/usage", nil, nil).StatusCode == http.StatusOK
	})
	key := e.key
	other := createKey(t, strings.TrimPrefix(e.store, "sqlite:"), "pro") // never used to authenticate
	jwt := "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlc2lnbmF0dXJl"
	chat := `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hi"}]}`
	type probe struct {
		name, method, path, body string
		header                   http.Header
		status                   int
		caller                   bool // identified: user_id and tier in the line
	}
	bearer := http.Header{"Authorization": {"Bearer " + key}}
	with := func(h http.Header, kv ...string) http.Header {
		out := h.Clone()
		if out == nil {
			out = http.Header{"Authorization": nil}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			out.Set(kv[i], kv[i+1])
		}
		return out
	}
	probes := []probe{
		{"a plain chat", "POST", "/v1/chat/completions", chat, bearer, 200, true},
		{"vgt_ in User-Agent", "POST", "/v1/chat/completions", chat, with(bearer, "User-Agent", "curl-vgt_"), 200, true},
		{"eyJ in User-Agent", "GET", "/v1/models", "", with(nil, "User-Agent", "probe-eyJ"), 401, false},
		{"a key in X-Api-Key", "GET", "/v1/models", "", with(nil, "X-Api-Key", other), 401, false},
		{"a key in X-Api-Key beside Authorization", "POST", "/v1/chat/completions", chat, with(bearer, "X-Api-Key", other), 200, true},
		{"a key in an unnamed header", "POST", "/v1/chat/completions", chat, with(bearer, "X-Trace", "id="+other+";x"), 200, true},
		{"a JWT in User-Agent", "GET", "/v1/models", "", with(nil, "User-Agent", "app/1 "+jwt), 401, false},
		{"a token in X-Auth-Token", "GET", "/v1/models", "", with(nil, "X-Auth-Token", "opaque-secret-123"), 401, false},
		{"a key in the query", "GET", "/v1/models?api_key=" + other, "", bearer, 400, false},
		{"a key in the query, percent-encoded", "GET", "/v1/models?x=vgt%5F" + other[4:], "", bearer, 400, false},
		{"a key in the path", "GET", "/v1/models/" + other, "", bearer, 404, false},
		{"a key in the path, percent-encoded", "GET", "/v1/models/vgt%5F" + other[4:], "", bearer, 404, false},
		{"a JWT in the path", "GET", "/v1/files/" + jwt, "", bearer, 404, false},
	}
	for i := range 5 { // a 401 storm, each hiding behind a key-like agent
		probes = append(probes, probe{fmt.Sprintf("bad key %d", i), "POST", "/v1/chat/completions", chat,
			with(nil, "Authorization", "Bearer "+other[:20]+"x"+other[21:], "User-Agent", "curl-vgt_"+other[4:12]), 401, false})
	}
	for i, p := range probes {
		h := with(p.header, "X-Probe", fmt.Sprint(i))
		res := e.do(t, p.method, p.path, strings.NewReader(p.body), h)
		if res.StatusCode != p.status {
			t.Errorf("%s: status %d, want %d", p.name, res.StatusCode, p.status)
		}
	}
	e.caddy.WaitLog(t, fmt.Sprintf(`"X-Probe":["%d"]`, len(probes)-1))
	log := e.caddy.ReadLog(t)
	lines := accessLines(t, log)
	logged := 0
	for i, p := range probes {
		got := lines[fmt.Sprint(i)]
		if len(got) != 1 {
			t.Errorf("%s: %d access log lines, want 1", p.name, len(got))
			continue
		}
		logged++
		l := got[0]
		if l.Status != p.status || l.Size <= 0 || l.Duration == nil {
			t.Errorf("%s: the line has status %d, size %d, duration %v; want %d, a size and a duration", p.name, l.Status, l.Size, l.Duration, p.status)
		}
		if p.caller && (!strings.HasPrefix(l.UserID, "key_") || l.Tier != "pro") {
			t.Errorf("%s: the line names the caller %q of tier %q, want its key ID and pro", p.name, l.UserID, l.Tier)
		}
	}
	t.Logf("%d of %d requests in the access log", logged, len(probes))
	for _, secret := range []string{key, other, jwt, "opaque-secret-123"} {
		for _, needle := range []string{secret, secret[len(secret)-8:], secret[4:12]} {
			if strings.Contains(log, needle) {
				t.Errorf("Caddy's log holds a credential (%d chars of %q…)", len(needle), secret[:6])
			}
		}
	}
}

// TestEscapedKeyBesideAStrayPercent: a client key percent-encoded in the
// query (vgt%5F…) is refused and redacted even when another parameter
// holds a stray '%' (q=100%), which url.QueryUnescape refuses whole.
func TestEscapedKeyBesideAStrayPercent(t *testing.T) {
	e := start(t)
	other := createKey(t, strings.TrimPrefix(e.store, "sqlite:"), "pro")
	res := e.do(t, http.MethodGet, "/v1/models?q=100%&x=vgt%5F"+other[4:], nil, http.Header{"X-Probe": {"stray"}})
	res.Body.Close()
	if res.StatusCode != http.StatusBadRequest {
		t.Errorf("a key in the query beside a stray %%: status %d, want 400 key_in_query", res.StatusCode)
	}
	e.caddy.WaitLog(t, `"X-Probe":["stray"]`)
	if strings.Contains(e.caddy.ReadLog(t), other[4:]) {
		t.Error("Caddy's log holds the client key")
	}
}

// TestKeyAsHostIsNotLogged: on a site that answers any name, a client
// key sent as the Host is in no line of Caddy's log: the access line
// shows it redacted, and reverse_proxy's debug line the upstream's host.
func TestKeyAsHostIsNotLogged(t *testing.T) {
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := newEnv(t, up, srv)
	e.caddy = harness.StartCaddy(t, vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}",
		"store "+strings.Replace(e.store, ":", " ", 1), "tier pro"), harness.AnyHost())
	other := createKey(t, strings.TrimPrefix(e.store, "sqlite:"), "pro")
	req := e.request(t, http.MethodGet, "/v1/models", nil, http.Header{"X-Probe": {"host"}})
	req.Host = other
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	e.caddy.WaitLog(t, `"X-Probe":["host"]`)
	for l := range strings.Lines(e.caddy.ReadLog(t)) {
		if strings.Contains(l, other[len(other)-8:]) {
			t.Errorf("Caddy's log holds the client key sent as Host: %.300s", l)
		}
	}
}
