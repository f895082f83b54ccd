package tests

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// startOpenDashboard starts the dashboard with allow_anonymous at the
// root of a site that answers any Host, as a site let in only by a
// remote_ip matcher or a VPN is, and the API under /v1/ beside it. With
// hosts, the dashboard is behind a host matcher of them.
func startOpenDashboard(t *testing.T, hosts string, dashboard ...string) *env {
	t.Helper()
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := newEnv(t, up, srv)
	store := strings.Replace(e.store, ":", " ", 1)
	api := vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store "+store, "tier free", "tier pro")
	lines := []string{"store " + store, "allow_anonymous"}
	for _, l := range dashboard {
		if l != "" {
			lines = append(lines, l)
		}
	}
	matcher, site := "", ""
	if hosts != "" {
		matcher, site = "@dash ", "\t@dash host "+hosts+"\n"
	}
	site += "\thandle /v1/* {\n\t" + strings.ReplaceAll(api, "\n", "\n\t") + "\n\t}\n" +
		"\thandle " + matcher + "{\n\t\tvigthoria_dashboard {\n\t\t\t" + strings.Join(lines, "\n\t\t\t") + "\n\t\t}\n\t}"
	e.caddy = harness.StartCaddy(t, site, harness.AnyHost())
	return e
}

// keyCount is how many keys the env's store holds.
func (e *env) keyCount(t *testing.T) int {
	t.Helper()
	st, err := sqlite.Open(strings.TrimPrefix(e.store, "sqlite:"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	recs, err := st.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return len(recs)
}

// doHost sends a request to the env's Caddy with the Host header host.
func (e *env) doHost(t *testing.T, method, host, path string, body io.Reader, header http.Header) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, e.caddy.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for k, v := range header {
		req.Header[k] = v
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

var csrfMeta = regexp.MustCompile(`name="csrf-token" content="([^"]+)"`)

// dashboardVisit loads the dashboard's page as a browser of host would,
// and returns its status, its CSRF token and the cookie it was given
// ("" for none).
func (e *env) dashboardVisit(t *testing.T, host string) (status int, token, cookie string) {
	t.Helper()
	res := e.doHost(t, http.MethodGet, host, "/", nil, nil)
	body, _ := io.ReadAll(res.Body)
	if m := csrfMeta.FindSubmatch(body); m != nil {
		token = string(m[1])
	}
	for _, c := range res.Cookies() {
		cookie = c.Name + "=" + c.Value
	}
	return res.StatusCode, token, cookie
}

// createAs asks the dashboard of host, as a page of origin, to create a
// key, with token and cookie; it returns the status and body.
func (e *env) createAs(t *testing.T, host, origin, token, cookie string) (int, string) {
	t.Helper()
	h := http.Header{"Origin": {origin}, "Content-Type": {"application/json"},
		"X-Csrf-Token": {token}, "Sec-Fetch-Site": {"same-origin"}}
	if cookie != "" {
		h.Set("Cookie", cookie)
	}
	res := e.doHost(t, http.MethodPost, host, "/api/keys", strings.NewReader(`{"name":"x","tier":"free"}`), h)
	body, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(body)
}

// TestDashboardRebinding checks that a dashboard with allow_anonymous on
// a site that answers any Host serves nothing to a Host its operator did
// not name: a page of evil.test resolved to 127.0.0.1 (DNS rebinding)
// gets no page, no token and no key. The addresses and localhost names
// still get it, and each visitor has a CSRF token of its own, bound to
// its cookie.
func TestDashboardRebinding(t *testing.T) {
	e := startOpenDashboard(t, "")
	port := e.caddy.Port
	evil := fmt.Sprintf("evil.test:%d", port)
	keys := e.keyCount(t)

	status, token, cookie := e.dashboardVisit(t, evil)
	t.Logf("the page for Host %s: %d, token %t", evil, status, token != "")
	if status != http.StatusMisdirectedRequest || token != "" || cookie != "" {
		t.Errorf("the page for Host %s: %d, token %q, cookie %q; want 421 and neither", evil, status, token, cookie)
	}
	if token == "" { // what the attacker has: the token of the own origin
		_, token, cookie = e.dashboardVisit(t, fmt.Sprintf("127.0.0.1:%d", port))
	}
	got, body := e.createAs(t, evil, "http://"+evil, token, cookie)
	t.Logf("creating a key for Host %s: %d %.120s", evil, got, body)
	if got != http.StatusMisdirectedRequest || strings.Contains(body, "vgt_") {
		t.Errorf("creating a key for Host %s: %d %.200s, want 421 and no secret", evil, got, body)
	}
	if n := e.keyCount(t); n != keys {
		t.Errorf("the store holds %d keys, want %d: a key was created", n, keys)
	}

	// The operator's own ways in: the listener's address, localhost.
	var tokens []string
	for _, host := range []string{fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("localhost:%d", port)} {
		status, token, cookie := e.dashboardVisit(t, host)
		if status != http.StatusOK || token == "" || cookie == "" {
			t.Fatalf("the page for Host %s: %d, token %q, cookie %q; want 200 with both", host, status, token, cookie)
		}
		if got, body := e.createAs(t, host, "http://"+host, token, cookie); got != http.StatusCreated {
			t.Errorf("creating a key for Host %s: %d %.200s, want 201", host, got, body)
		}
		// The token is the visitor's: without its cookie, or with
		// another's, it is refused.
		if got, _ := e.createAs(t, host, "http://"+host, token, ""); got != http.StatusForbidden {
			t.Errorf("a token without its cookie: %d, want 403", got)
		}
		_, other, otherCookie := e.dashboardVisit(t, host)
		if other == token {
			t.Error("two visitors got the same CSRF token")
		}
		if got, _ := e.createAs(t, host, "http://"+host, token, otherCookie); got != http.StatusForbidden {
			t.Errorf("a token with another visitor's cookie: %d, want 403", got)
		}
		tokens = append(tokens, token)
	}
	if n := e.keyCount(t); n != keys+2 {
		t.Errorf("the store holds %d keys, want %d", n, keys+2)
	}

	// A name the operator gave as the dashboard's origin is its own.
	// A name the operator gave as the dashboard's origin, or in a host
	// matcher before it, is its own.
	for _, c := range []struct{ hosts, origin string }{{"", "origin http://dash.test"}, {"dash.test", ""}} {
		e := startOpenDashboard(t, c.hosts, c.origin)
		if status, token, _ := e.dashboardVisit(t, fmt.Sprintf("dash.test:%d", e.caddy.Port)); status != http.StatusOK || token == "" {
			t.Errorf("%s%s: the page for dash.test: %d, token %q; want 200 with a token", c.hosts, c.origin, status, token)
		}
		// (421 from the dashboard; Caddy's empty 200 when no route matches)
		if status, token, cookie := e.dashboardVisit(t, fmt.Sprintf("evil.test:%d", e.caddy.Port)); token != "" || cookie != "" {
			t.Errorf("%s%s: the page for evil.test: %d, token %q, cookie %q; want neither", c.hosts, c.origin, status, token, cookie)
		}
	}
}

// rebindAttack is what a page of evil.test runs once its name resolves
// to the dashboard's address: read the page for its CSRF token, create a
// key with it. It resolves to what came of it.
const rebindAttack = `(async () => {
	const page = await fetch("/");
	const m = (await page.text()).match(/name="csrf-token" content="([^"]+)"/);
	if (!m) return "no token: " + page.status;
	const res = await fetch("api/keys", {method: "POST", headers: {"X-CSRF-Token": m[1], "Content-Type": "application/json"},
		body: JSON.stringify({name: "rebound", tier: "free"})});
	return res.status + " " + await res.text();
})()`

// TestBrowserDashboardRebinding runs a DNS rebinding attack in headless
// Chromium, evil.test resolving to 127.0.0.1: the page of evil.test reads
// the dashboard as its own origin and asks for a key. It gets nothing;
// the operator's page at the listener's address and at localhost does.
func TestBrowserDashboardRebinding(t *testing.T) {
	chromium := findChromium(t)
	e := startOpenDashboard(t, "")
	keys := e.keyCount(t)
	b := newBrowser(t, chromium, chromedp.Flag("host-resolver-rules", "MAP evil.test 127.0.0.1"))

	b.navigate(fmt.Sprintf("http://evil.test:%d/", e.caddy.Port))
	got := b.await(rebindAttack)
	t.Logf("the rebinding page: %.200s", got)
	if !strings.HasPrefix(got, "no token: 421") {
		t.Errorf("the rebinding page got %.300s, want no token (421)", got)
	}
	if n := e.keyCount(t); n != keys {
		t.Errorf("the store holds %d keys, want %d: the rebinding page created one", n, keys)
	}

	for _, origin := range []string{e.caddy.URL, fmt.Sprintf("http://localhost:%d", e.caddy.Port)} {
		b.navigate(origin + "/")
		if got := b.await(rebindAttack); !strings.HasPrefix(got, "201 ") || !strings.Contains(got, `"secret":"vgt_`) {
			t.Errorf("the operator's page at %s got %.300s, want 201 with the secret", origin, got)
		}
	}
	if n := e.keyCount(t); n != keys+2 {
		t.Errorf("the store holds %d keys, want %d", n, keys+2)
	}
}
