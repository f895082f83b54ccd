package tests

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"github.com/openai/openai-go/v3/option"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// dashboardUser and dashboardPassword are the operator basic_auth lets in.
const dashboardUser, dashboardPassword = "admin", "correct horse battery staple"

// startDashboard starts Caddy with the dashboard under /dashboard/,
// behind basic_auth, beside a vigthoria handler on the same store with
// prices, so that costs are shown, and the extra lines.
func startDashboard(t *testing.T, extra ...string) *env {
	t.Helper()
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := newEnv(t, up, srv)
	hash := dashboardHash(t)
	store := strings.Replace(e.store, ":", " ", 1)
	lines := append([]string{"store " + store, "tier free {\n\t\t\trequests 600/1m\n\t\t\tquota 1000000/month\n\t\t}",
		"tier pro {\n\t\t\tquota 5000000/month\n\t\t\tbudget 50/month\n\t\t}",
		"prices {\n\t\t\tvigthoria-* input 0.50 output 1.50\n\t\t}"}, extra...)
	site := fmt.Sprintf(`	handle_path /dashboard/* {
		basic_auth {
			%s %s
		}
		vigthoria_dashboard {
			store %s
		}
	}
`, dashboardUser, hash, store) + vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...)
	e.caddy = harness.StartCaddy(t, site)
	e.client = newClient(e.caddy.URL, e.key)
	return e
}

// basicAuth is the Authorization header of the dashboard's operator.
func basicAuth() string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(dashboardUser+":"+dashboardPassword))
}

// dashboardToken reads the CSRF token from the dashboard's page, and the
// cookie (name=value) it is bound to.
func dashboardToken(t *testing.T, e *env) (token, cookie string) {
	t.Helper()
	res := e.do(t, http.MethodGet, "/dashboard/", nil, http.Header{"Authorization": {basicAuth()}})
	body, _ := io.ReadAll(res.Body)
	m := regexp.MustCompile(`name="csrf-token" content="([^"]+)"`).FindSubmatch(body)
	if res.StatusCode != http.StatusOK || m == nil {
		t.Fatalf("the page: %d %s, want 200 with a CSRF token", res.StatusCode, body)
	}
	for name, want := range map[string]string{
		"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
		"X-Frame-Options":         "DENY",
		"X-Content-Type-Options":  "nosniff",
		"Referrer-Policy":         "no-referrer",
	} {
		if got := res.Header.Get(name); got != want {
			t.Errorf("the page's %s is %q, want %q", name, got, want)
		}
	}
	for _, c := range res.Cookies() {
		cookie = c.Name + "=" + c.Value
	}
	if cookie == "" {
		t.Fatal("the page set no cookie for its CSRF token")
	}
	return string(m[1]), cookie
}

// TestDashboardRefusals checks, over HTTP, that the dashboard needs
// basic_auth, that its JSON needs the CSRF token, and that a change
// needs a same-origin JSON request besides.
func TestDashboardRefusals(t *testing.T) {
	e := startDashboard(t)
	if res := e.do(t, http.MethodGet, "/dashboard/", nil, http.Header{"Authorization": nil}); res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("the page without credentials: %d, want basic_auth's 401", res.StatusCode)
	}
	token, cookie := dashboardToken(t, e)
	origin := e.caddy.URL
	create := `{"name":"x","tier":"free"}`
	for _, c := range []struct {
		name, method, path, body string
		header                   http.Header
		want                     int
	}{
		{"GET without the token", "GET", "keys", "", nil, 403},
		{"GET overview without the token", "GET", "overview?range=24h", "", nil, 403},
		{"GET live without the token", "GET", "live", "", nil, 403},
		{"GET a key without the token", "GET", "keys/key_x", "", nil, 403},
		{"PATCH without the token", "PATCH", "keys/key_x", `{"quota":null}`, http.Header{"Origin": {origin}, "Content-Type": {"application/json"}}, 403},
		{"rotate without the token", "POST", "keys/key_x/rotate", `{}`, http.Header{"Origin": {origin}, "Content-Type": {"application/json"}}, 403},
		{"GET with a wrong token", "GET", "overview", "", http.Header{"X-Csrf-Token": {token + "x"}}, 403},
		{"POST without the token", "POST", "keys", create, http.Header{"Origin": {origin}, "Content-Type": {"application/json"}}, 403},
		{"DELETE without the token", "DELETE", "keys/key_x", "", http.Header{"Origin": {origin}}, 403},
		{"POST from another site", "POST", "keys", create, http.Header{"X-Csrf-Token": {token}, "Origin": {origin}, "Sec-Fetch-Site": {"cross-site"}, "Content-Type": {"application/json"}}, 403},
		{"POST from another origin", "POST", "keys", create, http.Header{"X-Csrf-Token": {token}, "Origin": {"http://evil.example"}, "Content-Type": {"application/json"}}, 403},
		{"POST without Origin", "POST", "keys", create, http.Header{"X-Csrf-Token": {token}, "Content-Type": {"application/json"}}, 403},
		{"POST of a form", "POST", "keys", "name=x&tier=free", http.Header{"X-Csrf-Token": {token}, "Origin": {origin}, "Content-Type": {"application/x-www-form-urlencoded"}}, 415},
		{"GET with the token", "GET", "keys", "", http.Header{"X-Csrf-Token": {token}}, 200},
		{"POST same-origin JSON", "POST", "keys", create, http.Header{"X-Csrf-Token": {token}, "Origin": {origin}, "Sec-Fetch-Site": {"same-origin"}, "Content-Type": {"application/json"}}, 201},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := http.Header{"Authorization": {basicAuth()}, "Cookie": {cookie}}
			for k, v := range c.header {
				h[k] = v
			}
			res := e.do(t, c.method, "/dashboard/api/"+c.path, strings.NewReader(c.body), h)
			body, _ := io.ReadAll(res.Body)
			if res.StatusCode != c.want {
				t.Fatalf("got %d %s, want %d", res.StatusCode, body, c.want)
			}
			if cc := res.Header.Get("Cache-Control"); cc != "no-store" {
				t.Errorf("Cache-Control %q, want no-store", cc)
			}
			if c.want == 201 && !strings.Contains(string(body), `"secret":"vgt_`) {
				t.Errorf("the created key's answer %s holds no secret", body)
			}
			if c.want != 201 && strings.Contains(string(body), "vgt_") {
				t.Errorf("the answer %s holds a secret", body)
			}
		})
	}
	// The created key's secret is in its answer only: not in the logs.
	if log := e.caddy.ReadLog(t); strings.Contains(log, "vgt_") {
		t.Error("a secret reached Caddy's log")
	}
}

// TestDashboardShowsRefusals checks that a key past its request limit
// is refused with 429s, and that the dashboard's overview and the key's
// page count those refusals, by reason, in the current hour and day.
func TestDashboardShowsRefusals(t *testing.T) {
	e := startDashboard(t, "tier metered {\n\t\t\trequests 2/1m burst 2\n\t\t}")
	id, secret := e.addKey(t, "metered")
	e.waitKeysKnown(t)
	client := newClient(e.caddy.URL, secret)
	for i := range 2 {
		if _, err := client.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
	}
	const refused = 3
	for range refused {
		_, err := client.Chat.Completions.New(t.Context(), chatParams("hi"), option.WithMaxRetries(0))
		wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded")
	}
	// A caller without a key is refused too, and counted for no key.
	if status, _ := e.chatStatus(t, "Bearer vgt_nobody"); status != http.StatusUnauthorized {
		t.Fatalf("an unknown key: %d, want 401", status)
	}

	token, cookie := dashboardToken(t, e)
	get := func(path string, v any) {
		t.Helper()
		res := e.do(t, http.MethodGet, "/dashboard/api/"+path, nil, http.Header{"Authorization": {basicAuth()}, "X-Csrf-Token": {token}, "Cookie": {cookie}})
		body, _ := io.ReadAll(res.Body)
		if res.StatusCode != http.StatusOK {
			t.Fatalf("%s: %d %s", path, res.StatusCode, body)
		}
		if err := json.Unmarshal(body, v); err != nil {
			t.Fatalf("%s: %v: %s", path, err, body)
		}
	}
	type reasonTotal struct {
		Reason string `json:"reason"`
		Count  int64  `json:"count"`
	}
	type chart struct {
		Refused struct {
			Total []int64            `json:"total"`
			By    map[string][]int64 `json:"by"`
		} `json:"refused"`
	}
	// wantChart checks that the chart's refusals are the key's, all in
	// its last bucket (the current hour or day).
	wantChart := func(name string, c chart) {
		t.Helper()
		by := c.Refused.By["rate_limit_exceeded"]
		if len(c.Refused.By) != 1 || len(by) == 0 || by[len(by)-1] != refused || c.Refused.Total[len(by)-1] != refused {
			t.Errorf("%s: refusals by reason %v (total %v), want %d rate_limit_exceeded in the last bucket", name, c.Refused.By, c.Refused.Total, refused)
		}
		for i, n := range c.Refused.Total[:len(c.Refused.Total)-1] {
			if n != 0 {
				t.Errorf("%s: %d refusals in bucket %d, want none before the last", name, n, i)
			}
		}
	}
	want := []reasonTotal{{"rate_limit_exceeded", refused}}
	for _, rng := range []string{"24h", "30d"} {
		var o struct {
			Chart    chart         `json:"chart"`
			Refusals []reasonTotal `json:"refusals"`
		}
		get("overview?range="+rng, &o)
		wantChart("overview "+rng, o.Chart)
		if !slices.Equal(o.Refusals, want) {
			t.Errorf("overview %s: refusals %+v, want %+v", rng, o.Refusals, want)
		}
	}
	var k struct {
		Recent   chart         `json:"recent"`
		Days     chart         `json:"days"`
		Refusals []reasonTotal `json:"refusals"`
	}
	get("keys/"+id, &k)
	wantChart("the key's last 24 hours", k.Recent)
	wantChart("the key's days", k.Days)
	if !slices.Equal(k.Refusals, want) {
		t.Errorf("the key's refusals %+v, want %+v", k.Refusals, want)
	}
}

// TestBrowserDashboard drives the dashboard in a real headless Chromium
// behind basic_auth: its charts of the last 24 hours by 5 minutes are
// drawn with the seeded traffic, by tier and by model, its requests by
// outcome stacked, its range switch redraws them by day; it lists keys,
// a key created on it works at the proxy and stops working within a
// second of being revoked on it, and a form posted from another site, or
// a fetch without the CSRF token, changes nothing. It writes
// docs/dashboard.png and docs/dashboard-key.png when
// VIGTHORIA_UPDATE_SCREENSHOT=1.
func TestBrowserDashboard(t *testing.T) {
	chromium := findChromium(t)
	e := startDashboard(t)
	// Traffic to chart: chats of the pro key, and a refused one.
	for i := range 3 {
		if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("hello "+strconv.Itoa(i))); err != nil {
			t.Fatalf("chat %d: %v", i, err)
		}
	}
	wantAPIError(t, e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer vgt_wrong"}}), 401, "invalid_api_key")
	// A refusal of a known key, which the ledger counts by reason.
	noModel := func(key string) *http.Response {
		return e.do(t, http.MethodPost, "/v1/chat/completions", jsonBody(map[string]any{
			"messages": []map[string]string{{"role": "user", "content": "hi"}},
		}), http.Header{"Authorization": {"Bearer " + key}, "Content-Type": {"application/json"}})
	}
	wantAPIError(t, noModel(e.key), 400, "missing_model")

	b := newBrowser(t, chromium)
	if _, err := chromedp.Call(b.ctx, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{
		Headers: network.Headers{"Authorization": basicAuth()},
	}); err != nil {
		t.Fatal(err)
	}
	page := e.caddy.URL + "/dashboard/"
	b.navigate(page)

	// The overview's charts: uPlot canvases drawn with the ledger's
	// rows, the last 24 hours by 5 minutes first.
	waitJS(t, b, `(() => { const u = window.dash.charts.tokens; return !!u && u.data.length > 1 && u.data.slice(1).some(s => s.some(v => v > 0)); })()`)
	// drawn checks that each chart is a drawn canvas of buckets buckets
	// whose values sum above 0.
	drawn := func(buckets int, names ...string) {
		t.Helper()
		for _, name := range names {
			got := b.eval(fmt.Sprintf(`(() => { const u = window.dash.charts[%q]; const c = u.root.querySelector("canvas");
				return c.width + "x" + c.height + " " + u.data[0].length + " " + u.data.slice(1).flat().reduce((a, v) => a + v, 0); })()`, name))
			var w, h, n int
			var sum float64
			if _, err := fmt.Sscanf(got, "%dx%d %d %g", &w, &h, &n, &sum); err != nil || w == 0 || h == 0 || n != buckets || sum <= 0 {
				t.Errorf("chart %s: canvas, buckets and sum %q, want a drawn canvas of %d buckets summing above 0", name, got, buckets)
			}
		}
	}
	drawn(288, "requests", "tokens", "cost", "outcomes")
	// sum is the sum of a chart's values: of its series as drawn, or of
	// its raw values of one label (a stack draws running sums).
	sum := func(chart, label string) string {
		if label == "" {
			return b.eval(fmt.Sprintf(`window.dash.charts[%q].data.slice(1).flat().reduce((a, v) => a + v, 0)`, chart))
		}
		return b.eval(fmt.Sprintf(`(window.dash.charts[%q].raw[%q] || []).reduce((a, v) => a + v, 0)`, chart, label))
	}
	labels := func(chart string) string {
		return b.eval(fmt.Sprintf(`window.dash.charts[%q].series.slice(1).map(s => s.label).join()`, chart))
	}
	if got := sum("requests", ""); got != "3" {
		t.Errorf("the requests chart sums to %s, want the 3 chats", got)
	}
	if got := labels("requests"); got != "pro" {
		t.Errorf("the requests chart's series are %q, want the tier pro", got)
	}
	// Requests by outcome: the 3 chats served, the missing_model refused,
	// stacked, the top of the stack drawn first.
	if got := labels("outcomes"); got != "missing_model,served" {
		t.Errorf("the outcomes chart's series are %q, want missing_model on served", got)
	}
	if s, m := sum("outcomes", "served"), sum("outcomes", "missing_model"); s != "3" || m != "1" {
		t.Errorf("the outcomes chart holds %s served and %s missing_model, want 3 and 1", s, m)
	}
	if got := b.eval(`(() => { const d = window.dash.charts.outcomes.data; const i = d[1].findIndex(v => v > 0); return d[1][i] + "/" + d[2][i]; })()`); got != "4/3" {
		t.Errorf("the outcomes stack's top and bottom where it starts: %s, want 4/3", got)
	}
	// By model: the same charts split by the model of the chats.
	b.click(`#split button[data-split=model]`)
	waitJS(t, b, fmt.Sprintf(`window.dash.charts.tokens.series.slice(1).map(s => s.label).join() === %q`, model))
	drawn(288, "requests", "tokens", "cost")
	if got := sum("requests", ""); got != "3" {
		t.Errorf("the requests chart by model sums to %s, want the 3 chats", got)
	}
	if got := b.eval(`(() => { const u = window.dash.charts.refused; return u.series.slice(1).map(s => s.label).join() + " " + u.data.slice(1).flat().reduce((a, v) => a + v, 0); })()`); got != "missing_model 1" {
		t.Errorf("the refusals chart holds %q, want missing_model 1: the unknown key is counted for no key", got)
	}
	if got := b.text("#top tbody"); !strings.Contains(got, "test-pro") {
		t.Errorf("the top keys read %q, want test-pro", got)
	}
	waitJS(t, b, `!!window.dash.charts.live`)
	if got := b.text("#live-queued"); got != "0" {
		t.Errorf("the live panel shows %q queued, want 0: this site has no queue", got)
	}
	if got := b.text("#refusals tbody"); !strings.Contains(got, "invalid_api_key") {
		t.Errorf("the refusals read %q, want invalid_api_key", got)
	}

	// The last 30 days by day, then back.
	b.click(`#range button[data-range="30d"]`)
	waitJS(t, b, `window.dash.charts.tokens.data[0].length === 30`)
	drawn(30, "requests", "tokens", "cost", "outcomes")
	b.click(`#range button[data-range="24h"]`)
	waitJS(t, b, `window.dash.charts.tokens.data[0].length === 288`)
	if got := sum("requests", ""); got != "3" {
		t.Errorf("back to 24 hours, the requests chart sums to %s, want 3", got)
	}

	// The keys, with their usage.
	b.navigate(page + "#keys")
	waitJS(t, b, `document.querySelectorAll("#keys tbody tr").length >= 1`)
	if got := b.text("#keys tbody"); !strings.Contains(got, "test-pro") || !strings.Contains(got, "5,000,000 tok/month") {
		t.Errorf("the keys table reads %q, want test-pro with its quota", got)
	}

	// Create a key on the page: its secret, shown once, works at once.
	b.eval(`document.getElementById("new-name").value = "made-in-browser"`)
	b.eval(`document.getElementById("new-tier").value = "free"`)
	b.click(`#create button[type=submit]`)
	waitJS(t, b, `document.getElementById("secret-value").textContent.startsWith("vgt_")`)
	secret := b.text("#secret-value")
	served := 0 // the created key's chats answered
	chat := func() int {
		res := e.do(t, http.MethodPost, "/v1/chat/completions", jsonBody(map[string]any{
			"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}},
		}), http.Header{"Authorization": {"Bearer " + secret}, "Content-Type": {"application/json"}})
		io.Copy(io.Discard, res.Body)
		if res.StatusCode == http.StatusOK {
			served++
		}
		return res.StatusCode
	}
	eventually(t, "the created key works at the proxy", func() bool { return chat() == http.StatusOK })
	wantAPIError(t, noModel(secret), 400, "missing_model")

	// Revoke it on the page: the proxy refuses it within a second.
	waitJS(t, b, `!!document.querySelector("#keys tbody tr[data-id] button[data-action=revoke]")`)
	id := b.eval(`[...document.querySelectorAll("#keys tbody tr")].find(tr => tr.textContent.includes("made-in-browser")).dataset.id`)
	b.eval(`window.confirm = () => true`)
	b.click(fmt.Sprintf(`#keys tbody tr[data-id=%q] button[data-action=revoke]`, id))
	revoked := time.Now()
	eventually(t, "the revoked key is refused", func() bool { return chat() == http.StatusUnauthorized })
	t.Logf("revoked on the page, refused by the proxy %v later", time.Since(revoked).Round(time.Millisecond))

	// One key's page: its usage chart by model. The ledger writes once a
	// second, and the chats were moments ago: the page is opened again
	// until it shows them, then checked.
	waitFor(t, 5*time.Second, "the key's page shows its chats and refusal of today", func() bool {
		b.navigate(page + "#keys")
		b.navigate(page + "#key/" + id)
		waitJS(t, b, `!!window.dash.charts["key-recent"] && window.dash.charts["key-recent"].data.length > 1`)
		return sum("key-days", "") != "0" && sum("key-outcomes", "missing_model") == "1"
	})
	if got, recent, days := labels("key-recent"), sum("key-recent", ""), sum("key-days", ""); got != model || recent == "0" || recent != days {
		t.Errorf("the key's tokens, last 24 hours: %s by model %q, want the %s tokens of its chat today, of %s", recent, got, days, model)
	}
	if s, m := sum("key-outcomes", "served"), sum("key-outcomes", "missing_model"); s != strconv.Itoa(served) || m != "1" {
		t.Errorf("the key's outcomes: %s served and %s missing_model, want %d and 1", s, m, served)
	}
	if got := b.text("#key-models tbody"); !strings.Contains(got, model) {
		t.Errorf("the key's models read %q, want %s", got, model)
	}
	if got := b.text("#key-refusals tbody"); got != "missing_model1" {
		t.Errorf("the key's refusals read %q, want missing_model 1", got)
	}
	if got := b.eval(`window.dash.charts["key-refused"].data.slice(1).flat().reduce((a, v) => a + v, 0)`); got != "1" {
		t.Errorf("the key's refusals chart sums to %s, want 1", got)
	}

	keys := func() string {
		return b.eval(`document.getElementById("keys-total").textContent`)
	}
	b.navigate(page + "#keys")
	waitJS(t, b, `document.getElementById("keys-total").textContent !== ""`)
	before := keys()

	// A fetch of the page's own origin without the token is refused.
	b.eval(`window.__status = 0; fetch("api/keys", {method: "POST", headers: {"Content-Type": "application/json"}, body: '{"name":"nope","tier":"free"}'}).then(r => { window.__status = r.status; })`)
	waitJS(t, b, `window.__status !== 0`)
	if got := b.eval(`window.__status`); got != "403" {
		t.Errorf("a fetch without the CSRF token: %s, want 403", got)
	}

	// A form on another site posting to the dashboard, with the
	// operator's credentials, is refused.
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `<!doctype html><form id="f" method="POST" action="%sapi/keys" enctype="text/plain">
<input name='{"name":"evil","tier":"pro","x":"' value='"}'></form><script>document.getElementById("f").submit()</script>`, page)
	}))
	t.Cleanup(evil.Close)
	b.navigate(evil.URL)
	waitJS(t, b, `location.href.includes("/dashboard/api/keys")`)
	if got := b.eval(`document.body.textContent`); !strings.Contains(got, "X-CSRF-Token") {
		t.Errorf("the cross-site form got %q, want the CSRF refusal", got)
	}
	b.navigate(page + "#keys")
	waitJS(t, b, `document.getElementById("keys-total").textContent !== ""`)
	if got := keys(); got != before {
		t.Errorf("the keys went from %s to %s: a refused request made one", before, got)
	}

	// A day of traffic, written to the store by another writer (as
	// another instance's ledger would): the charts show it, and it
	// makes the screenshots.
	b.navigate(page + "#overview")
	waitJS(t, b, `!!window.dash.charts.requests && window.dash.charts.requests.data[0].length === 288`)
	shown, err := strconv.Atoi(sum("requests", ""))
	if err != nil {
		t.Fatal(err)
	}
	pro, seeded := seedDay(t, strings.TrimPrefix(e.store, "sqlite:"))
	b.navigate(page + "#keys")
	waitJS(t, b, `document.getElementById("keys-total").textContent !== ""`)
	b.navigate(page + "#overview")
	want := strconv.FormatInt(int64(shown)+seeded, 10)
	waitJS(t, b, fmt.Sprintf(`window.dash.charts.requests.data.slice(1).flat().reduce((a, v) => a + v, 0) === %s`, want))
	if got := labels("requests"); got != "free,pro" {
		t.Errorf("the requests chart's series after the seeded day are %q, want free,pro", got)
	}
	update := os.Getenv("VIGTHORIA_UPDATE_SCREENSHOT") == "1"
	b.screenshot("dashboard.png", update)
	// The keys: a destructive action looks it.
	b.navigate(page + "#keys")
	waitJS(t, b, `document.querySelectorAll("#keys tbody tr").length > 0`)
	waitJS(t, b, `[...document.querySelectorAll('#keys button[data-action="revoke"]')].every((b) => b.classList.contains("danger"))`)
	b.screenshot("dashboard-keys.png", update)
	b.navigate(page + "#key/" + pro)
	waitJS(t, b, `!!window.dash.charts["key-recent"] && window.dash.charts["key-recent"].series.length === 3`)
	b.screenshot("dashboard-key.png", update)
}

// seedDay writes a day of 5-minute, hourly and daily ledger rows to the
// SQLite store at path, as another instance's ledger would: the key
// test-pro on two models, and a new key batch-job of tier free on one,
// with refusals. It returns test-pro's ID and the requests written.
func seedDay(t *testing.T, path string) (pro string, requests int64) {
	t.Helper()
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := t.Context()
	recs, err := st.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.Name == "test-pro" {
			pro = r.ID
		}
	}
	batch, _, err := keystore.Create(ctx, st, keystore.Attrs{Name: "batch-job", Tier: "free"}, time.Now())
	if err != nil || pro == "" {
		t.Fatalf("the keys: test-pro %q, batch-job %v", pro, err)
	}
	b := store.UsageBatch{Writer: "seed", Seq: 1}
	hours := make(map[[3]string]*store.UsageRow)
	days := make(map[[3]string]*store.UsageRow)
	add := func(client, model string, at time.Time, n int64) {
		row := store.UsageRow{Client: client, Day: store.Slot(at), Model: model, Requests: n,
			PromptTokens: 120 * n, CompletionTokens: 80 * n}
		row.Cost = row.PromptTokens/2 + row.CompletionTokens*3/2 // the test's prices, per million
		b.Slots = append(b.Slots, row)
		for _, by := range []struct {
			m    map[[3]string]*store.UsageRow
			name string
		}{{hours, store.Hour(at)}, {days, store.Day(at)}} {
			m, name := by.m, by.name
			k := [3]string{client, name, model}
			if m[k] == nil {
				m[k] = &store.UsageRow{Client: client, Day: name, Model: model}
			}
			m[k].Add(row)
		}
		requests += n
	}
	now := time.Now()
	// From 5 minutes to 23 hours 20 minutes ago: far from the edges of
	// the chart's 24 hours, which move while the test runs.
	for i := 1; i <= 280; i++ {
		at := now.Add(-time.Duration(i) * store.SlotStep)
		wave := int64(i % 48) // a rise and fall every 4 hours
		if wave > 24 {
			wave = 48 - wave
		}
		add(pro, model, at, 2+wave/3)
		add(pro, "vigthoria-pro-1", at, 1+int64(i%5))
		add(batch.ID, model, at, 4+wave/2)
		if i%20 == 0 {
			b.SlotRefusals = append(b.SlotRefusals, store.RefusalRow{Client: batch.ID, Hour: store.Slot(at), Reason: "rate_limit_exceeded", Count: 3})
			b.Refusals = append(b.Refusals, store.RefusalRow{Client: batch.ID, Hour: store.Hour(at), Reason: "rate_limit_exceeded", Count: 3})
		}
	}
	for _, r := range hours {
		b.Hours = append(b.Hours, *r)
	}
	for _, r := range days {
		b.Rows = append(b.Rows, *r)
	}
	if err := st.AddUsage(ctx, b); err != nil {
		t.Fatal(err)
	}
	return pro, requests
}

// waitJS waits up to 10 seconds for a JavaScript expression to be true.
func waitJS(t *testing.T, b *browser, expr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for b.eval(expr) != "true" {
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: not within 10s; page error %q\nconsole:\n%s", expr, b.eval(`document.getElementById("error") ? document.getElementById("error").textContent : ""`), b.consoleText())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDashboardWithoutAuthWarns checks that a dashboard served with no
// auth handler before it logs so, once.
func TestDashboardWithoutAuthWarns(t *testing.T) {
	c := harness.StartCaddy(t, "\tvigthoria_dashboard {\n\t\tstore sqlite "+t.TempDir()+"/keys.db\n\t}")
	for range 2 {
		res, err := http.Get(c.URL + "/")
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Fatalf("the page: %d, want 200", res.StatusCode)
		}
	}
	const warning = "the dashboard is served without authentication"
	if !c.WaitLog(t, warning) {
		t.Fatal("no warning of a dashboard without authentication")
	}
	if n := strings.Count(c.ReadLog(t), warning); n != 1 {
		t.Errorf("the warning was logged %d times, want once", n)
	}
}
