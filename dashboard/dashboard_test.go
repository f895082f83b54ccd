package dashboard

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
	_ "github.com/vigthoria/caddy-vigthoria/store/redis" // the backends the tests' specs name
	_ "github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// fakeSource is a Source of one store without a vigthoria handler's
// tiers but "free", limited to 1000 tokens a day.
type fakeSource struct{ counters Counters }

func (fakeSource) KeyService(string) (*keys.Service, string, func() error, error) {
	panic("not used: the tests make the Handler by hand")
}
func (fakeSource) Policy(string) Policy  { return fakePolicy{} }
func (f *fakeSource) Counters() Counters { return f.counters }
func (fakeSource) String() string        { return "fake" }

type fakePolicy struct{}

func (fakePolicy) Tiers() []string  { return []string{"free"} }
func (fakePolicy) Currency() string { return "USD" }
func (fakePolicy) Caller(client string) (string, bool) {
	switch {
	case strings.HasPrefix(client, "mint:"):
		return "", true
	case strings.HasPrefix(client, "jwt:"):
		return "free", false
	}
	return "", false
}
func (fakePolicy) Limits(tier string, s *policy.Settings) (Limits, bool) {
	if tier != "free" {
		return Limits{}, false
	}
	return Limits{Quota: &policy.Amount{N: 1000, Period: "day"}}, true
}

// newTestHandler is a Handler over a started SQLite store with n keys of
// tier free, named key-00000 on.
func newTestHandler(t testing.TB, n int) (*Handler, *fakeSource) {
	t.Helper()
	return newTestHandlerOn(t, "sqlite:"+filepath.Join(t.TempDir(), "k.db"), n)
}

// newTestHandlerOn is newTestHandler over the store spec.
func newTestHandlerOn(t testing.TB, spec string, n int) (*Handler, *fakeSource) {
	t.Helper()
	svc, err := keys.NewService(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Stop() })
	now := time.Now()
	for i := range n {
		if _, _, err := keys.Create(t.Context(), svc.Store(), keys.Attrs{Name: fmt.Sprintf("key-%05d", i), Tier: "free"}, now); err != nil {
			t.Fatal(err)
		}
	}
	src := &fakeSource{counters: Counters{Refused: map[string]int64{}}}
	return &Handler{source: src, keys: svc, spec: spec, logger: zap.NewNop(), live: newSampler(src.Counters), AllowAnonymous: true}, src
}

// testNonce is the CSRF nonce of the tests' visitor.
const testNonce = "AAAAAAAAAAAAAAAAAAAAAA"

// withToken gives r the visitor's cookie and user's CSRF token for it.
func withToken(r *http.Request, user string) {
	r.AddCookie(&http.Cookie{Name: csrfCookie, Value: testNonce})
	r.Header.Set("X-CSRF-Token", csrfToken(user, testNonce))
}

// get serves GET api/<route> as the anonymous operator, with its token.
func get(t testing.TB, h *Handler, route string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(http.MethodGet, "http://localhost/api/"+route, nil)
	withToken(r, "anonymous")
	w := httptest.NewRecorder()
	if err := h.ServeHTTP(w, r, nil); err != nil {
		t.Fatal(err)
	}
	return w
}

// TestKeysPage checks a page of 10,000 keys: the first 50 in the order
// asked, their limits and usage, and the search; and logs how long the
// page took (the figure the README reports; a timing goal is not a test).
func TestKeysPage(t *testing.T) {
	h, _ := newTestHandler(t, 10_000)
	recs, _ := h.keys.Store().List(t.Context())
	busy := recs[1234].ID
	h.keys.Ledger().Add(busy, "m", time.Now(), ledger.Tokens{Prompt: 300, Completion: 100, Cost: 42})

	begin := time.Now()
	w := get(t, h, "keys?sort=usage&desc=1")
	t.Logf("a page of 10,000 keys, sorted by usage: %v, %d bytes", time.Since(begin).Round(time.Millisecond), w.Body.Len())
	var rep keysReport
	if err := json.Unmarshal(w.Body.Bytes(), &rep); err != nil || w.Code != 200 {
		t.Fatalf("got %d %s (%v)", w.Code, w.Body.Bytes()[:min(200, w.Body.Len())], err)
	}
	if rep.Total != 10_000 || len(rep.Keys) != pageSize {
		t.Fatalf("got %d keys of %d, want %d of 10000", len(rep.Keys), rep.Total, pageSize)
	}
	top := rep.Keys[0]
	if top.ID != busy || top.Month.Tokens != 400 || top.Month.Cost != 42 || top.Quota == nil || top.Quota.Used != 400 || top.Quota.Limit != 1000 {
		t.Errorf("the first key by usage is %+v, want %s with 400 of its 1000 tokens a day", top, busy)
	}
	if strings.Contains(w.Body.String(), "vgt_") || strings.Contains(w.Body.String(), `"hash"`) {
		t.Error("the page holds a secret or a hash")
	}

	w = get(t, h, "keys?q=KEY-0999&page=1")
	if err := json.Unmarshal(w.Body.Bytes(), &rep); err != nil || rep.Total != 10 || rep.Keys[0].Name != "key-09990" {
		t.Fatalf("searching key-0999: got %d keys, first %+v (%v), want 10 from key-09990", rep.Total, rep.Keys, err)
	}
	if w := get(t, h, "keys?page=200"); !strings.Contains(w.Body.String(), `"key-09950"`) {
		t.Errorf("the last page does not start at key-09950: %.200s", w.Body.String())
	}
	// A hostile page number: the last page, not a negative offset.
	for _, page := range []string{"9223372036854775807", "-5", "1e9", "x"} {
		w := get(t, h, "keys?page="+page)
		if w.Code != http.StatusOK {
			t.Errorf("page %s: %d %.200s", page, w.Code, w.Body.String())
		}
	}
}

// TestOverview checks the overview's buckets by 5 minutes and by day,
// by tier, by model and by outcome; that a minted token's user is
// counted once, in its minting key's rows; and that a caller without a
// key is charted under the tier the policy gives it.
func TestOverview(t *testing.T) {
	h, _ := newTestHandler(t, 2)
	recs, _ := h.keys.Store().List(t.Context())
	now := time.Now()
	l := h.keys.Ledger()
	l.Add(recs[0].ID, "a", now, ledger.Tokens{Prompt: 10})
	l.Add(recs[1].ID, "b", now.Add(-3*time.Hour), ledger.Tokens{Completion: 5})
	l.Add("someone", "b", now.Add(-3*time.Hour), ledger.Tokens{Completion: 1})
	// A minted user's request: the proxy adds it to the user's rows and
	// to its minting key's.
	l.Add("mint:"+recs[0].ID+":ann", "a", now, ledger.Tokens{Prompt: 2})
	l.Add(recs[0].ID, "a", now, ledger.Tokens{Prompt: 2})
	l.Add("jwt:id.example:bob", "b", now, ledger.Tokens{Prompt: 4})
	for _, reason := range []string{"rate_limit_exceeded", "rate_limit_exceeded", "missing_model"} {
		if err := l.Refuse(recs[1].ID, reason, now); err != nil {
			t.Fatal(err)
		}
	}
	for _, rng := range []string{"24h", "30d"} {
		var rep overviewReport
		if err := json.Unmarshal(get(t, h, "overview?range="+rng).Body.Bytes(), &rep); err != nil {
			t.Fatal(err)
		}
		c := rep.Chart
		n := len(c.Times)
		last := n - 1
		sum := func(s []int64) (total int64) {
			for _, v := range s {
				total += v
			}
			return total
		}
		if got := sum(c.Tokens.Total); got != 22 {
			t.Errorf("%s: %d tokens, want 22: the minted user's 2 once", rng, got)
		}
		if got, want := sum(c.Tokens.By["free"]), int64(21); got != want {
			t.Errorf("%s: tier free used %d tokens, want %d: the keys' and the JWT user's", rng, got, want)
		}
		if got := sum(c.Tokens.By["(other)"]); got != 1 || len(c.Tokens.By) != 2 {
			t.Errorf("%s: tokens by tier %v, want free and (other) with 1", rng, c.Tokens.By)
		}
		if got := c.Tokens.ByModel; sum(got["a"]) != 12 || sum(got["b"]) != 10 || len(got) != 2 {
			t.Errorf("%s: tokens by model %v, want a 12 and b 10", rng, got)
		}
		if got := c.Requests.ByModel["a"][last]; got != 2 {
			t.Errorf("%s: %d requests of model a in the last bucket, want 2", rng, got)
		}
		o := c.Outcomes.By
		if sum(o["served"]) != 5 || o["rate_limit_exceeded"][last] != 2 || o["missing_model"][last] != 1 || len(o) != 3 || sum(c.Outcomes.Total) != 8 {
			t.Errorf("%s: outcomes %v, want 5 served, 2 rate_limit_exceeded and 1 missing_model now", rng, o)
		}
		switch {
		case rng == "24h" && (n != 288 || c.Step != 300 || c.Tokens.Total[last] != 16 || c.Tokens.Total[last-36] != 6):
			t.Errorf("24h: %d buckets of %ds, tokens %v, want 288 of 300s with 16 last and 6 three hours before", n, c.Step, c.Tokens.Total)
		case rng == "30d" && (n != 30 || c.Step != 86400):
			t.Errorf("30d: %d buckets of %ds, want 30 days", n, c.Step)
		}
		// List orders keys made in the same millisecond by ID: recs[0]
		// is either of them.
		if len(rep.Top) != 4 || rep.Top[0].ID != recs[0].ID || rep.Top[0].Name != recs[0].Name || rep.Top[0].Tokens != 12 {
			t.Errorf("%s: top keys %+v, want 4 with %s first with 12 tokens", rng, rep.Top, recs[0].ID)
		}
		for _, k := range rep.Top {
			if strings.HasPrefix(k.ID, "mint:") {
				t.Errorf("%s: the minted user %s is in the top keys beside its key", rng, k.ID)
			}
			if k.ID == "jwt:id.example:bob" && k.Tier != "free" {
				t.Errorf("%s: the JWT user's tier is %q, want free", rng, k.Tier)
			}
		}
	}
}

// TestKeyReport checks one key's page: its usage by 5 minutes and by
// day, by model, and its refusals.
func TestKeyReport(t *testing.T) {
	h, _ := newTestHandler(t, 1)
	recs, _ := h.keys.Store().List(t.Context())
	id := recs[0].ID
	now := time.Now()
	earlier := now.Add(-10 * time.Minute)
	l := h.keys.Ledger()
	l.Add(id, "a", earlier, ledger.Tokens{Prompt: 3})
	l.Add(id, "b", now, ledger.Tokens{Prompt: 4, Completion: 1})
	l.Add("key_other", "a", now, ledger.Tokens{Prompt: 100})
	if err := l.Refuse(id, "quota_exceeded", now); err != nil {
		t.Fatal(err)
	}
	var rep keyReport
	if w := get(t, h, "keys/"+id); w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &rep) != nil {
		t.Fatalf("got %d %s", w.Code, w.Body)
	}
	r := rep.Recent
	last := len(r.Times) - 1
	if len(r.Times) != 288 || r.Tokens.By["b"][last] != 5 || r.Tokens.By["a"][last-2] != 3 {
		t.Errorf("recent: %d buckets, tokens by model %v, want 288 with b 5 last and a 3 ten minutes before", len(r.Times), r.Tokens.By)
	}
	if r.Refused.By["quota_exceeded"][last] != 1 || r.Outcomes.By["served"][last] != 1 {
		t.Errorf("recent: refused %v, outcomes %v, want 1 quota_exceeded and 1 served last", r.Refused.By, r.Outcomes.By)
	}
	// Ten minutes before is yesterday in the first ten minutes of a UTC
	// day.
	today, yesterday := int64(8), int64(0)
	if store.Day(earlier) != store.Day(now) {
		today, yesterday = 5, 3
	}
	if d, last := rep.Days, len(rep.Days.Times)-1; d.Tokens.Total[last] != today || d.Tokens.Total[last-1] != yesterday ||
		len(rep.Models) != 2 || rep.Models[0].Model != "b" {
		t.Errorf("days: tokens %v, models %+v, want %d today and %d the day before, b then a", d.Tokens.Total, rep.Models, today, yesterday)
	}
	if len(rep.Refusals) != 1 || rep.Refusals[0].Count != 1 || rep.Limits == nil || rep.Limits.Quota.N != 1000 {
		t.Errorf("refusals %+v, limits %+v, want 1 quota_exceeded and the tier's quota", rep.Refusals, rep.Limits)
	}
}

// TestLive checks the live rates from two samples of the counters.
func TestLive(t *testing.T) {
	s := newSampler(func() Counters { return Counters{} })
	now := time.Now()
	n := int64(0)
	s.read = func() Counters {
		n += 10
		// Each sample, 10 more requests; 4 more admitted after waiting
		// 1.5 s in all; 3 waiting now.
		return Counters{Requests: n, Refused: map[string]int64{"rate_limited": n / 10}, Streams: 2,
			Queued: 3, QueueWaited: 4 * n / 10, QueueWait: 1.5 * float64(n/10)}
	}
	s.report(now)
	s.report(now.Add(100 * time.Millisecond)) // too soon: no new sample
	rep := s.report(now.Add(2 * time.Second))
	if len(rep.Points) != 1 || rep.Points[0].Requests != 5 || rep.Points[0].Refused != 0.5 || rep.Streams != 2 || rep.Refused["rate_limited"] != 2 {
		t.Fatalf("got %+v, want one point of 5 requests/s and 0.5 refusals/s", rep)
	}
	if p := rep.Points[0]; p.Queued != 3 || p.QueueWait != 0.375 || rep.Queued != 3 {
		t.Errorf("queued %d (%d now), mean wait %v s; want 3 and 0.375 s", p.Queued, rep.Queued, p.QueueWait)
	}
}

// TestCheckRequest checks the CSRF and same-origin rules.
func TestCheckRequest(t *testing.T) {
	token := csrfToken("alice", testNonce)
	for _, c := range []struct {
		name, method, ctype, origin, site, token string
		want                                     int
	}{
		{"read", "GET", "", "", "", token, 0},
		{"read without the token", "GET", "", "", "", "", 403},
		{"another user's token", "GET", "", "", "", csrfToken("bob", testNonce), 403},
		{"another visitor's token", "GET", "", "", "", csrfToken("alice", "BBBBBBBBBBBBBBBBBBBBBB"), 403},
		{"change", "POST", "application/json", "http://dash.example", "same-origin", token, 0},
		{"change without Sec-Fetch-Site", "PATCH", "application/json; charset=utf-8", "http://dash.example", "", token, 0},
		{"revoke", "DELETE", "", "http://dash.example", "same-origin", token, 0},
		{"change without the token", "POST", "application/json", "http://dash.example", "same-origin", "", 403},
		{"cross-site", "POST", "application/json", "http://dash.example", "cross-site", token, 403},
		{"same-site", "POST", "application/json", "http://dash.example", "same-site", token, 403},
		{"another origin", "POST", "application/json", "http://evil.example", "", token, 403},
		{"no origin", "POST", "application/json", "", "", token, 403},
		{"a form", "POST", "text/plain", "http://dash.example", "same-origin", token, 415},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest(c.method, "http://dash.example/api/keys", nil)
			r.AddCookie(&http.Cookie{Name: csrfCookie, Value: testNonce})
			for k, v := range map[string]string{"Content-Type": c.ctype, "Origin": c.origin, "Sec-Fetch-Site": c.site, "X-CSRF-Token": c.token} {
				if v != "" {
					r.Header.Set(k, v)
				}
			}
			if got, why := (&Handler{}).checkRequest(r, "alice"); got != c.want {
				t.Errorf("got %d (%s), want %d", got, why, c.want)
			}
		})
	}
}

// TestPublicOrigin: behind a proxy that terminates TLS, the configured
// origin is the one changes must come from.
func TestPublicOrigin(t *testing.T) {
	h := &Handler{Origin: "https://dash.example"}
	for origin, want := range map[string]int{"https://dash.example": 0, "http://dash.example": 403} {
		r := httptest.NewRequest(http.MethodPost, "http://dash.example/api/keys", nil)
		r.Header.Set("Origin", origin)
		r.Header.Set("Content-Type", "application/json")
		withToken(r, "alice")
		if got, why := h.checkRequest(r, "alice"); got != want {
			t.Errorf("a change from %s: %d (%s), want %d", origin, got, why, want)
		}
	}
}

// TestAnonymousOperator: without an operator, the JSON is refused unless
// allow_anonymous says the site lets only operators in.
func TestAnonymousOperator(t *testing.T) {
	h, _ := newTestHandler(t, 1)
	h.User = "{http.auth.user.id}"
	for allow, want := range map[bool]int{false: http.StatusForbidden, true: http.StatusOK} {
		h.AllowAnonymous = allow
		r := httptest.NewRequest(http.MethodGet, "http://localhost/api/overview", nil)
		r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
		withToken(r, "anonymous")
		w := httptest.NewRecorder()
		if err := h.ServeHTTP(w, r, nil); err != nil || w.Code != want {
			t.Errorf("allow_anonymous %v: %d %v, want %d", allow, w.Code, err, want)
		}
	}
}

// BenchmarkKeysPage is a page of api/keys over 10,000 keys.
func BenchmarkKeysPage(b *testing.B) {
	h, _ := newTestHandler(b, 10_000)
	for b.Loop() {
		if w := get(b, h, "keys?sort=usage&desc=1"); w.Code != 200 {
			b.Fatal(w.Code)
		}
	}
}

// BenchmarkOverview is api/overview over 10,000 keys, 100 of which used
// two models in every 5 minutes of the last 24 hours (57,600 rows of
// 5 minutes, 4,800 hourly ones).
func BenchmarkOverview(b *testing.B) {
	for _, store := range []string{"sqlite", "redis"} {
		spec := "sqlite:" + filepath.Join(b.TempDir(), "k.db")
		if store == "redis" {
			spec = redistest.Start(b).URL
		}
		h, _ := busyHandler(b, spec)
		for _, rng := range []string{"24h", "30d"} {
			b.Run(store+"/"+rng, func(b *testing.B) {
				for b.Loop() {
					w := get(b, h, "overview?range="+rng)
					if w.Code != 200 || !strings.Contains(w.Body.String(), `"top":[{`) {
						b.Fatalf("%d %.200s", w.Code, w.Body.String())
					}
				}
			})
		}
	}
}

// BenchmarkKeyReport is api/keys/{id} of one of the busy keys of
// BenchmarkOverview.
func BenchmarkKeyReport(b *testing.B) {
	h, id := busyHandler(b, "sqlite:"+filepath.Join(b.TempDir(), "k.db"))
	for b.Loop() {
		if w := get(b, h, "keys/"+id); w.Code != 200 || !strings.Contains(w.Body.String(), `"recent":{`) {
			b.Fatalf("%d %.200s", w.Code, w.Body.String())
		}
	}
}

// busyHandler is a Handler over 10,000 keys, 100 of which used two
// models in every 5 minutes of the last 24 hours, and one of those.
func busyHandler(b *testing.B, spec string) (*Handler, string) {
	h, _ := newTestHandlerOn(b, spec, 10_000)
	recs, err := h.keys.Store().List(b.Context())
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	// A batch a key, as small as Redis's timeout needs.
	for n, rec := range recs[:100] {
		batch := store.UsageBatch{Writer: "seed", Seq: uint64(n + 1)}
		for i := range 288 {
			at := now.Add(-time.Duration(i) * store.SlotStep)
			for _, m := range []string{"a", "b"} {
				row := store.UsageRow{Client: rec.ID, Day: store.Slot(at), Model: m, Requests: 1, PromptTokens: 10, CompletionTokens: 5, Cost: 3}
				batch.Slots = append(batch.Slots, row)
				row.Day = store.Hour(at)
				batch.Hours = append(batch.Hours, row)
			}
		}
		if err := h.keys.Store().AddUsage(b.Context(), batch); err != nil {
			b.Fatal(err)
		}
	}
	return h, recs[50].ID
}

// TestCheckRequestWithoutCookie: a token is of use only with the cookie
// of the visitor it was made for.
func TestCheckRequestWithoutCookie(t *testing.T) {
	for name, cookie := range map[string]string{"none": "", "malformed": "x", "too long": testNonce + "AA"} {
		r := httptest.NewRequest(http.MethodGet, "http://dash.example/api/keys", nil)
		if cookie != "" {
			r.AddCookie(&http.Cookie{Name: csrfCookie, Value: cookie})
		}
		r.Header.Set("X-CSRF-Token", csrfToken("alice", cookie))
		if got, _ := (&Handler{}).checkRequest(r, "alice"); got != http.StatusForbidden {
			t.Errorf("cookie %s: %d, want 403", name, got)
		}
	}
}

// TestHostAllowed checks the names the dashboard answers to without host
// matchers before it: addresses, localhost names and its origin's host.
func TestHostAllowed(t *testing.T) {
	h := &Handler{originHost: "dash.example.com"}
	for host, want := range map[string]bool{
		"127.0.0.1:2019": true, "127.0.0.1": true, "[::1]:8080": true, "10.1.2.3:80": true, "[fe80::1]": true,
		"localhost:2019": true, "LOCALHOST": true, "dash.localhost:80": true, "": true,
		"dash.example.com": true, "Dash.Example.com:8443": true,
		"evil.test:2019": false, "evil.test": false, "localhost.evil.test": false, "127.0.0.1.nip.io": false,
		"example.com": false, "dash.example.com.evil.test": false,
	} {
		r := httptest.NewRequest(http.MethodGet, "http://x/", nil)
		r.Host = host
		if got := h.hostAllowed(r); got != want {
			t.Errorf("Host %q: %v, want %v", host, got, want)
		}
	}
	// No origin: no name but localhost's.
	r := httptest.NewRequest(http.MethodGet, "http://dash.example.com/", nil)
	if (&Handler{}).hostAllowed(r) {
		t.Error("Host dash.example.com without origin or host matchers: allowed")
	}
}
