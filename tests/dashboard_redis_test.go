package tests

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"golang.org/x/crypto/bcrypt"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// TestDashboardRedis runs the dashboard on store redis, with a real
// redis-server. One Caddy serves the dashboard, behind basic_auth, and a
// vigthoria handler; another, in its own process, serves a vigthoria
// handler of the same Redis, and takes the traffic. The dashboard's
// overview and the key's page hold that traffic, by tier, model and
// outcome; a key created through the dashboard's JSON (its CSRF token,
// same-origin) shows its tier's limits merged with its own settings and
// works at the other instance, and once revoked through the dashboard
// the other instance refuses it within a second.
func TestDashboardRedis(t *testing.T) {
	rds := redistest.Start(t)
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	st, err := redisstore.Open(rds.URL)
	if err != nil {
		t.Fatal(err)
	}
	rec, key, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "redis-pro", Tier: "pro"}, time.Now())
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	lines := []string{"store redis " + rds.URL,
		"tier free {\n\t\t\trequests 600/1m\n\t\t\tquota 1000000/month\n\t\t}",
		"tier pro {\n\t\t\tquota 5000000/month\n\t\t}",
		"prices {\n\t\t\tvigthoria-* input 0.50 output 1.50\n\t\t}"}
	block := vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...)
	proxy := harness.StartProcess(t, block)
	hash := dashboardHash(t)
	dash := harness.StartCaddy(t, fmt.Sprintf(`	handle_path /dashboard/* {
		basic_auth {
			%s %s
		}
		vigthoria_dashboard {
			store redis %s
		}
	}
`, dashboardUser, hash, rds.URL)+block)
	e := &env{upstream: up, server: srv, caddy: dash, key: key, store: "redis:" + rds.URL}

	// Traffic through the other instance: three chats of the key, and a
	// request it refuses.
	chat := func(secret string, body map[string]any) int {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, proxy.URL+"/v1/chat/completions", jsonBody(body))
		req.Header.Set("Authorization", "Bearer "+secret)
		req.Header.Set("Content-Type", "application/json")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		return res.StatusCode
	}
	hi := map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}
	waitFor(t, 10*time.Second, "the other instance serves the key", func() bool { return chat(key, hi) == http.StatusOK })
	for range 2 {
		if s := chat(key, hi); s != http.StatusOK {
			t.Fatalf("a chat: %d, want 200", s)
		}
	}
	if s := chat(key, map[string]any{"messages": hi["messages"]}); s != http.StatusBadRequest {
		t.Fatalf("a chat without a model: %d, want 400", s)
	}

	token, cookie := dashboardToken(t, e)
	call := func(method, path, body string, v any) int {
		t.Helper()
		h := http.Header{"Authorization": {basicAuth()}, "X-Csrf-Token": {token}, "Cookie": {cookie}, "Origin": {dash.URL}}
		if body != "" {
			h.Set("Content-Type", "application/json")
		}
		res := e.do(t, method, "/dashboard/api/"+path, strings.NewReader(body), h)
		b, _ := io.ReadAll(res.Body)
		if v != nil && res.StatusCode < 300 {
			if err := json.Unmarshal(b, v); err != nil {
				t.Fatalf("%s %s: %v: %s", method, path, err, b)
			}
		}
		return res.StatusCode
	}
	type series struct {
		Total   []int64            `json:"total"`
		By      map[string][]int64 `json:"by"`
		ByModel map[string][]int64 `json:"by_model"`
	}
	type overview struct {
		Chart struct {
			Times    []int64 `json:"times"`
			Requests series  `json:"requests"`
			Cost     series  `json:"cost"`
			Outcomes series  `json:"outcomes"`
		} `json:"chart"`
		Top []struct {
			ID       string `json:"id"`
			Requests int64  `json:"requests"`
		} `json:"top"`
	}
	sum := func(s []int64) (n int64) {
		for _, v := range s {
			n += v
		}
		return n
	}
	// The other instance's ledger writes its batch within a second or
	// so; the dashboard reads it from Redis.
	for _, rng := range []string{"24h", "30d"} {
		var o overview
		waitFor(t, 10*time.Second, "the overview of "+rng+" holds the other instance's traffic", func() bool {
			o = overview{}
			return call(http.MethodGet, "overview?range="+rng, "", &o) == http.StatusOK && sum(o.Chart.Outcomes.By["served"]) == 3
		})
		c := o.Chart
		if got := sum(c.Outcomes.By["missing_model"]); got != 1 || len(c.Outcomes.By) != 2 {
			t.Errorf("%s: outcomes %v, want 3 served and 1 missing_model", rng, c.Outcomes.By)
		}
		if got := sum(c.Requests.By["pro"]); got != 3 || len(c.Requests.By) != 1 {
			t.Errorf("%s: requests by tier %v, want 3 of pro", rng, c.Requests.By)
		}
		if got := sum(c.Requests.ByModel[model]); got != 3 || len(c.Requests.ByModel) != 1 {
			t.Errorf("%s: requests by model %v, want 3 of %s", rng, c.Requests.ByModel, model)
		}
		if sum(c.Cost.Total) <= 0 {
			t.Errorf("%s: cost %v, want the chats' cost", rng, c.Cost.Total)
		}
		if len(o.Top) != 1 || o.Top[0].ID != rec.ID || o.Top[0].Requests != 3 {
			t.Errorf("%s: top keys %+v, want %s with 3 requests", rng, o.Top, rec.ID)
		}
	}
	var k struct {
		Recent struct {
			Tokens   series `json:"tokens"`
			Outcomes series `json:"outcomes"`
		} `json:"recent"`
	}
	if s := call(http.MethodGet, "keys/"+rec.ID, "", &k); s != http.StatusOK {
		t.Fatalf("the key's page: %d", s)
	}
	if sum(k.Recent.Tokens.By[model]) <= 0 || sum(k.Recent.Outcomes.By["served"]) != 3 || sum(k.Recent.Outcomes.By["missing_model"]) != 1 {
		t.Errorf("the key's last 24 hours: tokens %v, outcomes %v, want %s's tokens, 3 served and 1 missing_model", k.Recent.Tokens.By, k.Recent.Outcomes.By, model)
	}

	// A key made on the dashboard, with its own request rate: refused
	// without the token, made with it.
	create := `{"name":"made-on-dashboard","tier":"free","settings":{"requests":{"n":100,"window":"1m"}}}`
	h := http.Header{"Authorization": {basicAuth()}, "Origin": {dash.URL}, "Content-Type": {"application/json"}}
	if res := e.do(t, http.MethodPost, "/dashboard/api/keys", strings.NewReader(create), h); res.StatusCode != http.StatusForbidden {
		t.Fatalf("a create without the CSRF token: %d, want 403", res.StatusCode)
	}
	var made struct {
		ID     string `json:"id"`
		Secret string `json:"secret"`
	}
	if s := call(http.MethodPost, "keys", create, &made); s != http.StatusCreated || !strings.HasPrefix(made.Secret, "vgt_") {
		t.Fatalf("create: %d %+v, want 201 with a secret", s, made)
	}
	var page struct {
		Keys []struct {
			ID     string `json:"id"`
			Limits *struct {
				Requests *struct{ N int64 } `json:"requests"`
				Quota    *struct {
					N      int64
					Period string
				} `json:"quota"`
			} `json:"limits"`
		} `json:"keys"`
	}
	if s := call(http.MethodGet, "keys?q=made-on-dashboard", "", &page); s != http.StatusOK || len(page.Keys) != 1 {
		t.Fatalf("the keys page: %d %+v, want the made key", s, page)
	}
	if l := page.Keys[0].Limits; l == nil || l.Requests == nil || l.Requests.N != 100 || l.Quota == nil || l.Quota.N != 1_000_000 || l.Quota.Period != "month" {
		t.Errorf("the made key's limits %+v, want its own 100 requests a minute and its tier's quota of 1,000,000 a month", l)
	}
	eventually(t, "the other instance serves the key made on the dashboard", func() bool { return chat(made.Secret, hi) == http.StatusOK })

	// Revoked on the dashboard: the other instance refuses it within a
	// second.
	if s := call(http.MethodDelete, "keys/"+made.ID, "", nil); s != http.StatusOK {
		t.Fatalf("revoke: %d, want 200", s)
	}
	revoked := time.Now()
	eventually(t, "the other instance refuses the revoked key", func() bool { return chat(made.Secret, hi) == http.StatusUnauthorized })
	t.Logf("revoked on the dashboard, refused by the other instance %v later", time.Since(revoked).Round(time.Millisecond))
}

// dashboardHash is the bcrypt hash of the operator's password, for
// basic_auth.
func dashboardHash(t *testing.T) string {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte(dashboardPassword), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(hash)
}
