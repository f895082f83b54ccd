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

	"github.com/vigthoria/caddy-vigthoria/keystore"
)

// fakeSource is a Source of one store without a vigthoria handler's
// tiers but "free", limited to 1000 tokens a day.
type fakeSource struct{ counters Counters }

func (fakeSource) KeyService(string) (*keystore.Service, string, func() error, error) {
	panic("not used: the tests make the Handler by hand")
}
func (fakeSource) Policy(string) Policy  { return fakePolicy{} }
func (f *fakeSource) Counters() Counters { return f.counters }
func (fakeSource) String() string        { return "fake" }

type fakePolicy struct{}

func (fakePolicy) Tiers() []string  { return []string{"free"} }
func (fakePolicy) Currency() string { return "USD" }
func (fakePolicy) Limits(tier string, s *keystore.Settings) (Limits, bool) {
	if tier != "free" {
		return Limits{}, false
	}
	return Limits{Quota: &keystore.Amount{N: 1000, Period: "day"}}, true
}

// newTestHandler is a Handler over a started SQLite store with keys
// keys of tier free, named key-00000 on.
func newTestHandler(t testing.TB, keys int) (*Handler, *fakeSource) {
	t.Helper()
	spec := "sqlite:" + filepath.Join(t.TempDir(), "k.db")
	svc, err := keystore.NewService(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Stop() })
	now := time.Now()
	for i := range keys {
		if _, _, err := keystore.Create(t.Context(), svc.Store(), keystore.Attrs{Name: fmt.Sprintf("key-%05d", i), Tier: "free"}, now); err != nil {
			t.Fatal(err)
		}
	}
	src := &fakeSource{counters: Counters{Refused: map[string]int64{}}}
	return &Handler{source: src, keys: svc, spec: spec, logger: zap.NewNop(), live: newSampler(src.Counters), AllowAnonymous: true}, src
}

// get serves GET api/<route> as the anonymous operator, with its token.
func get(t testing.TB, h *Handler, route string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(http.MethodGet, "/api/"+route, nil)
	r.Header.Set("X-CSRF-Token", csrfToken("anonymous"))
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
	h.keys.Ledger().Add(busy, "m", time.Now(), keystore.Tokens{Prompt: 300, Completion: 100, Cost: 42})

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

// TestOverview checks the overview's buckets by hour and by day.
func TestOverview(t *testing.T) {
	h, _ := newTestHandler(t, 2)
	recs, _ := h.keys.Store().List(t.Context())
	now := time.Now()
	h.keys.Ledger().Add(recs[0].ID, "a", now, keystore.Tokens{Prompt: 10})
	h.keys.Ledger().Add(recs[1].ID, "b", now.Add(-3*time.Hour), keystore.Tokens{Completion: 5})
	h.keys.Ledger().Add("someone", "b", now.Add(-3*time.Hour), keystore.Tokens{Completion: 1})
	for _, rng := range []string{"24h", "30d"} {
		var rep overviewReport
		if err := json.Unmarshal(get(t, h, "overview?range="+rng).Body.Bytes(), &rep); err != nil {
			t.Fatal(err)
		}
		n := len(rep.Chart.Times)
		var sum int64
		for _, v := range rep.Chart.Tokens.Total {
			sum += v
		}
		if sum != 16 || rep.Chart.Tokens.By["free"] == nil || rep.Chart.Tokens.By["(other)"] == nil {
			t.Errorf("%s: tokens %v by %v, want 16 of tiers free and (other)", rng, rep.Chart.Tokens.Total, rep.Chart.Tokens.By)
		}
		if rng == "24h" && (n != 24 || rep.Chart.Tokens.Total[23] != 10 || rep.Chart.Tokens.Total[20] != 6) {
			t.Errorf("24h: %d buckets, tokens %v, want 24 with 10 last and 6 three hours before", n, rep.Chart.Tokens.Total)
		}
		if rng == "30d" && (n != 30 || rep.Chart.Step != 86400) {
			t.Errorf("30d: %d buckets of %ds, want 30 days", n, rep.Chart.Step)
		}
		// List orders keys made in the same millisecond by ID: recs[0]
		// is either of them.
		if len(rep.Top) != 3 || rep.Top[0].ID != recs[0].ID || rep.Top[0].Name != recs[0].Name {
			t.Errorf("%s: top keys %+v, want 3 with %s first", rng, rep.Top, recs[0].ID)
		}
	}
}

// TestLive checks the live rates from two samples of the counters.
func TestLive(t *testing.T) {
	s := newSampler(func() Counters { return Counters{} })
	now := time.Now()
	n := int64(0)
	s.read = func() Counters {
		n += 10
		return Counters{Requests: n, Refused: map[string]int64{"rate_limited": n / 10}, Streams: 2}
	}
	s.report(now)
	s.report(now.Add(100 * time.Millisecond)) // too soon: no new sample
	rep := s.report(now.Add(2 * time.Second))
	if len(rep.Points) != 1 || rep.Points[0].Requests != 5 || rep.Points[0].Refused != 0.5 || rep.Streams != 2 || rep.Refused["rate_limited"] != 2 {
		t.Fatalf("got %+v, want one point of 5 requests/s and 0.5 refusals/s", rep)
	}
}

// TestCheckRequest checks the CSRF and same-origin rules.
func TestCheckRequest(t *testing.T) {
	token := csrfToken("alice")
	for _, c := range []struct {
		name, method, ctype, origin, site, token string
		want                                     int
	}{
		{"read", "GET", "", "", "", token, 0},
		{"read without the token", "GET", "", "", "", "", 403},
		{"another user's token", "GET", "", "", "", csrfToken("bob"), 403},
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
		r.Header.Set("X-CSRF-Token", csrfToken("alice"))
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
		r := httptest.NewRequest(http.MethodGet, "/api/overview", nil)
		r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
		r.Header.Set("X-CSRF-Token", csrfToken("anonymous"))
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
