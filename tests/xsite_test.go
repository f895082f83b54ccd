package tests

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"golang.org/x/crypto/bcrypt"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// The user basic_auth lets in, whom the identity placeholder names.
const xsiteUser, xsitePassword = "alice", "hunter2"

// xsiteChat is a chat body; the stand-in answers it with tokens to charge.
const xsiteChat = `{"model":"vigthoria-fast-1","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}`

// startAmbient starts Caddy with basic_auth before a vigthoria handler
// whose identity is the user it let in, of tier pro; keys and the
// anonymous tier besides. With optional, basic_auth sees only requests
// that send Basic credentials. pre goes before the handler in the site
// (a page of the site's own, say).
func startAmbient(t *testing.T, optional bool, pre string, extra ...string) *env {
	t.Helper()
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := newEnv(t, up, srv)
	hash, err := bcrypt.GenerateFromPassword([]byte(xsitePassword), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	lines := append([]string{"store sqlite " + strings.TrimPrefix(e.store, "sqlite:"),
		"tier free {\n\t\t\trequests 100/1h\n\t\t}", "tier pro {\n\t\t\trequests 100/1h\n\t\t}",
		"identity {http.auth.user.id} tier pro", "anonymous free"}, extra...)
	site := fmt.Sprintf("\tbasic_auth {\n\t\t%s %s\n\t}\n%s", xsiteUser, hash, pre)
	if optional {
		site = "\t@basic header Authorization \"Basic *\"\n" + strings.Replace(site, "basic_auth {", "basic_auth @basic {", 1)
	}
	site += vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...)
	e.caddy = harness.StartCaddy(t, site)
	e.client = newClient(e.caddy.URL, e.key)
	return e
}

// basicUsage is what GET /v1/usage tells the basic_auth user: the tokens
// charged today and the requests left; reading it takes one request.
func (e *env) basicUsage(t *testing.T) (tokens, requestsLeft int64) {
	t.Helper()
	u := readUsage(t, e.caddy.URL, func(req *http.Request) { req.SetBasicAuth(xsiteUser, xsitePassword) })
	if u.ClientID != "user:"+xsiteUser || u.Limits.Requests == nil {
		t.Fatalf("GET /v1/usage as %s: %+v", xsiteUser, u)
	}
	return u.Today.TotalTokens, u.Limits.Requests.Remaining
}

// TestCrossSiteRequests checks over HTTP who may call from a web page of
// another origin: callers identified by what a browser sends by itself
// (basic_auth's credentials through identity, or their address as
// anonymous) are refused with 403 origin_not_allowed, whatever the
// request; callers with a key are not. And every caller's POST body must
// be declared JSON (or not declared at all), else 415.
func TestCrossSiteRequests(t *testing.T) {
	e := startAmbient(t, true, "")
	own := e.caddy.URL
	basic := "Basic " + basicCredentials(xsiteUser, xsitePassword)
	jsonCT := http.Header{"Content-Type": {"application/json"}}
	with := func(h http.Header, kv ...string) http.Header {
		h = h.Clone()
		for i := 0; i < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		return h
	}
	for _, c := range []struct {
		name   string
		method string
		path   string
		auth   string // "" for none
		header http.Header
		status int
		code   string
	}{
		{"basic, no Origin", "POST", "/v1/chat/completions", basic, jsonCT, 200, ""},
		{"basic, its own origin", "POST", "/v1/chat/completions", basic, with(jsonCT, "Origin", own), 200, ""},
		{"basic, same-origin fetch", "POST", "/v1/chat/completions", basic, with(jsonCT, "Sec-Fetch-Site", "same-origin"), 200, ""},
		{"basic, typed in the address bar", "GET", "/v1/models", basic, http.Header{"Sec-Fetch-Site": {"none"}}, 200, ""},
		{"basic, JSON in other case with charset", "POST", "/v1/chat/completions", basic, http.Header{"Content-Type": {"Application/JSON ; charset=utf-8"}}, 200, ""},
		{"basic, no Content-Type", "POST", "/v1/chat/completions", basic, nil, 200, ""},
		{"basic, another origin", "POST", "/v1/chat/completions", basic, with(jsonCT, "Origin", "http://evil.test"), 403, "origin_not_allowed"},
		{"basic, another port", "POST", "/v1/chat/completions", basic, with(jsonCT, "Origin", "http://127.0.0.1:1"), 403, "origin_not_allowed"},
		{"basic, Origin null", "POST", "/v1/chat/completions", basic, with(jsonCT, "Origin", "null"), 403, "origin_not_allowed"},
		{"basic, cross-site without Origin", "GET", "/v1/usage", basic, http.Header{"Sec-Fetch-Site": {"cross-site"}}, 403, "origin_not_allowed"},
		{"basic, same-site without Origin", "GET", "/v1/models", basic, http.Header{"Sec-Fetch-Site": {"same-site"}}, 403, "origin_not_allowed"},
		{"basic, a text/plain form", "POST", "/v1/chat/completions", basic, http.Header{"Content-Type": {"text/plain"}}, 415, "unsupported_media_type"},
		{"basic, an urlencoded form", "POST", "/v1/embeddings", basic, http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}, 415, "unsupported_media_type"},
		{"basic, a multipart form", "POST", "/v1/completions", basic, http.Header{"Content-Type": {"multipart/form-data; boundary=x"}}, 415, "unsupported_media_type"},
		{"basic, JSON and text", "POST", "/v1/chat/completions", basic, http.Header{"Content-Type": {"application/json", "text/plain"}}, 415, "unsupported_media_type"},
		{"basic, JSON-like", "POST", "/v1/chat/completions", basic, http.Header{"Content-Type": {"application/jsonx"}}, 415, "unsupported_media_type"},
		{"anonymous, another origin", "POST", "/v1/chat/completions", "", with(jsonCT, "Origin", "http://evil.test"), 403, "origin_not_allowed"},
		{"anonymous, cross-site without Origin", "GET", "/v1/models", "", http.Header{"Sec-Fetch-Site": {"cross-site"}}, 403, "origin_not_allowed"},
		{"anonymous, no Origin", "POST", "/v1/chat/completions", "", jsonCT, 200, ""},
		{"key, another origin", "POST", "/v1/chat/completions", "Bearer " + e.key, with(jsonCT, "Origin", "http://evil.test"), 200, ""},
		{"key, cross-site without Origin", "GET", "/v1/models", "Bearer " + e.key, http.Header{"Sec-Fetch-Site": {"cross-site"}}, 200, ""},
		{"key, a text/plain body", "POST", "/v1/chat/completions", "Bearer " + e.key, http.Header{"Content-Type": {"text/plain"}}, 415, "unsupported_media_type"},
		{"key, a text/plain token request", "POST", "/vigthoria/tokens", "Bearer " + e.key, http.Header{"Content-Type": {"text/plain"}}, 415, "unsupported_media_type"},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := c.header.Clone()
			if h == nil {
				h = http.Header{}
			}
			h["Authorization"] = nil
			if c.auth != "" {
				h.Set("Authorization", c.auth)
			}
			var body io.Reader
			if c.method == "POST" {
				body = strings.NewReader(xsiteChat)
				if c.path == "/v1/embeddings" {
					body = strings.NewReader(`{"model":"vigthoria-embed-1","input":"hi"}`)
				}
			}
			calls := e.upstream.Count()
			res := e.do(t, c.method, c.path, body, h)
			if res.StatusCode != c.status {
				b, _ := io.ReadAll(res.Body)
				t.Fatalf("got %d %.200s, want %d %s", res.StatusCode, b, c.status, c.code)
			}
			if c.code == "" {
				return
			}
			wantAPIError(t, res, c.status, c.code)
			e.wantUpstreamCalls(t, calls)
		})
	}

	// Without Basic credentials basic_auth leaves the identity unset:
	// the caller is anonymous, not one user named by the placeholder.
	res := e.do(t, "GET", "/v1/usage", nil, http.Header{"Authorization": nil})
	var u usageAnswer
	if err := json.NewDecoder(res.Body).Decode(&u); err != nil || !strings.HasPrefix(u.ClientID, "ip:") {
		t.Errorf("a caller without credentials is %q (%v), want anonymous", u.ClientID, err)
	}

	// The official SDK declares its bodies JSON: served, and the upstream
	// got the Content-Type it sent.
	if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
		t.Fatalf("the openai-go client: %v", err)
	}
	if ct := e.lastRequest(t).Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("openai-go sent Content-Type %q, want application/json", ct)
	}

	// An origin that cors lists may call as the basic_auth user; one it
	// does not list may not, whatever the caller.
	lines := []string{"store sqlite " + strings.TrimPrefix(e.store, "sqlite:"), "tier free", "tier pro",
		"identity {http.auth.user.id} tier pro", "anonymous free", "cors http://app.test"}
	hash, _ := bcrypt.GenerateFromPassword([]byte(xsitePassword), bcrypt.MinCost)
	if err := e.caddy.Load(fmt.Sprintf("\t@basic header Authorization \"Basic *\"\n\tbasic_auth @basic {\n\t\t%s %s\n\t}\n", xsiteUser, hash) +
		vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...)); err != nil {
		t.Fatal(err)
	}
	closeIdle()
	for origin, want := range map[string]int{"http://app.test": 200, "http://evil.test": 403} {
		res := e.do(t, "POST", "/v1/chat/completions", strings.NewReader(xsiteChat), with(jsonCT, "Authorization", basic, "Origin", origin))
		io.Copy(io.Discard, res.Body)
		if res.StatusCode != want {
			t.Errorf("basic_auth user from %s with cors http://app.test: %d, want %d", origin, res.StatusCode, want)
		}
	}
}

func basicCredentials(user, password string) string {
	req, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
	req.SetBasicAuth(user, password)
	return strings.TrimPrefix(req.Header.Get("Authorization"), "Basic ")
}

// crossSitePages serves the pages of TestBrowserCrossSite: /evil is a
// page of another site that makes the user's browser call the proxy at
// proxy, by a text/plain form it submits at once (a JSON body in the
// field's name), a link to GET /v1/models, a no-cors fetch of a typeless
// Blob, and an image; /app/
// is the site's own page, which calls it as its scripts do.
func crossSitePages(proxy string) http.Handler {
	name, value := strings.TrimSuffix(xsiteChat, "}")+`,"pad":"`, `"}`
	mux := http.NewServeMux()
	mux.HandleFunc("/evil", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintf(w, `<!doctype html><title>another site</title>
<img id="img" src="%[1]s/v1/usage">
<a id="link" href="%[1]s/v1/models">models</a>
<form id="form" method="POST" action="%[1]s/v1/chat/completions" enctype="text/plain">
<input type="hidden" name='%[2]s' value='%[3]s'>
</form>
<script>
window.blob = () => fetch("%[1]s/v1/chat/completions", {method: "POST", mode: "no-cors", credentials: "include",
	body: new Blob([%[4]q])}).then(() => "sent", (e) => "failed: " + e);
</script>`, proxy, name, value, xsiteChat)
	})
	mux.HandleFunc("/app/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintf(w, `<!doctype html><title>the site's own page</title>
<script>
window.chat = () => fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"}, body: %q})
	.then(async (r) => r.status + " " + (await r.text()), (e) => "failed: " + e);
</script>`, xsiteChat)
	})
	return mux
}

// TestBrowserCrossSite drives headless Chromium as a user whom basic_auth
// let in: a page of another site (evil.test, mapped to 127.0.0.1) makes
// her browser POST a text/plain form whose field name is a JSON chat and
// follow a link to GET /v1/models, both carrying her cached credentials,
// and send a no-cors fetch of a typeless Blob and an image of GET
// /v1/usage (which Chromium sends without them). Nothing reaches the upstream and
// nothing is charged to her: no tokens, no request of her limit. The
// site's own page still calls the proxy as her.
func TestBrowserCrossSite(t *testing.T) {
	chromium := findChromium(t)
	pages := httptest.NewUnstartedServer(nil)
	pagePort := pages.Listener.Addr().(*net.TCPAddr).Port
	e := startAmbient(t, false, fmt.Sprintf("\thandle /app/* {\n\t\treverse_proxy 127.0.0.1:%d\n\t}\n", pagePort))
	pages.Config.Handler = crossSitePages(e.caddy.URL)
	pages.Start()
	t.Cleanup(pages.Close)

	b := newBrowser(t, chromium, chromedp.Flag("host-resolver-rules", "MAP evil.test 127.0.0.1"))
	// She signs in: the browser keeps her credentials for the proxy's
	// origin and sends them by itself from then on.
	signIn := strings.Replace(e.caddy.URL, "http://", "http://"+xsiteUser+":"+xsitePassword+"@", 1)
	b.navigate(signIn + "/v1/usage")
	if got := b.eval(`document.body.innerText`); !strings.Contains(got, `"client_id":"user:alice"`) {
		t.Fatalf("signing in: the page reads %.300s", got)
	}
	tokens, left := e.basicUsage(t)
	calls := e.upstream.Count()

	// The other site's page: its image loads as it opens, its form is
	// submitted, the page then being the proxy's answer.
	evil := fmt.Sprintf("http://evil.test:%d/evil", pagePort)
	b.navigate(evil)
	if got := b.await(`blob()`); got != "sent" {
		t.Errorf("the no-cors fetch: %s", got)
	}
	// The form, then the link, each leaving the page for the proxy's
	// answer: top-level navigations, which carry her credentials.
	var answers []string
	for _, click := range []string{`document.getElementById("form").submit()`, `document.getElementById("link").click()`} {
		if len(answers) > 0 {
			b.navigate(evil)
		}
		b.eval(click)
		var answer string
		waitFor(t, 10*time.Second, "the answer to "+click, func() bool {
			if !strings.HasPrefix(b.eval(`location.href`), e.caddy.URL) {
				return false
			}
			answer = b.eval(`document.body ? document.body.innerText : ""`)
			return answer != ""
		})
		t.Logf("the other site's %s: %.300s", click, answer)
		answers = append(answers, answer)
	}
	time.Sleep(300 * time.Millisecond) // the fetch and the image, whatever became of them

	upstream := e.upstream.Count() - calls
	tokens2, left2 := e.basicUsage(t)
	// Reading one's own usage takes nothing of the requests limit.
	t.Logf("from the other site: %d upstream calls, %d tokens and %d requests charged", upstream, tokens2-tokens, left-left2)
	if upstream != 0 {
		t.Errorf("the other site's requests reached the upstream %d times, want none", upstream)
	}
	if tokens2 != tokens || left2 != left {
		t.Errorf("the other site's requests charged %d tokens and %d requests to %s, want none", tokens2-tokens, left-left2, xsiteUser)
	}
	if !strings.Contains(answers[0], `"code":"unsupported_media_type"`) {
		t.Errorf("the form's answer is %.300s, want 415 unsupported_media_type", answers[0])
	}
	if !strings.Contains(answers[1], `"code":"origin_not_allowed"`) {
		t.Errorf("the link's answer is %.300s, want 403 origin_not_allowed", answers[1])
	}

	// The site's own page, on the proxy's origin, calls it as she.
	calls = e.upstream.Count()
	b.navigate(e.caddy.URL + "/app/")
	if got := b.await(`chat()`); !strings.HasPrefix(got, "200 ") {
		t.Errorf("the site's own page: %.300s, want 200", got)
	}
	e.wantUpstreamCalls(t, calls+1)
	if tokens3, _ := e.basicUsage(t); tokens3 <= tokens2 {
		t.Errorf("the site's own chat charged %d tokens, want some", tokens3-tokens2)
	}
}
