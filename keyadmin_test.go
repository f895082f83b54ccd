package vigthoria

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// adminServer serves the module's admin routes as Caddy's admin endpoint
// does, errors included.
func adminServer(t *testing.T) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	for _, route := range (adminAPI{}).Routes() {
		mux.Handle(route.Pattern, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			err := route.Handler.ServeHTTP(w, r)
			if err == nil {
				return
			}
			var apiErr caddy.APIError
			if !errors.As(err, &apiErr) {
				t.Errorf("%s %s: error %v is not a caddy.APIError", r.Method, r.URL, err)
				apiErr = caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(apiErr.HTTPStatus)
			json.NewEncoder(w).Encode(map[string]string{"error": apiErr.Err.Error()})
		}))
	}
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// call makes an admin request and returns the status, body and headers.
func call(t *testing.T, srv *httptest.Server, method, path, body string) (int, string, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, srv.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res.StatusCode, string(b), res.Header
}

func decode[T any](t *testing.T, body string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("decoding %q: %v", body, err)
	}
	return v
}

func TestAdminWithoutService(t *testing.T) {
	srv := adminServer(t)
	status, body, _ := call(t, srv, http.MethodGet, "/vigthoria/keys", "")
	if status != http.StatusServiceUnavailable || !strings.Contains(body, "no key store is open") {
		t.Errorf("GET without a service: %d %s, want 503 saying why", status, body)
	}
}

func TestAdminManagesKeys(t *testing.T) {
	s, _ := startService(t)
	srv := adminServer(t)

	status, body, header := call(t, srv, http.MethodPost, "/vigthoria/keys", `{"name":"from admin","tier":"pro","expires":"720h"}`)
	if status != http.StatusCreated {
		t.Fatalf("POST /vigthoria/keys: %d %s", status, body)
	}
	if header.Get("Cache-Control") != "no-store" {
		t.Error("an answer with a secret may be cached")
	}
	created := decode[keys.KeyInfo](t, body)
	if !clientkey.Valid(created.Secret) || !strings.HasPrefix(created.ID, "key_") || created.Name != "from admin" ||
		created.Tier != "pro" || created.State != store.StateActive || created.Expires == nil ||
		created.Expires.Sub(created.Created) != 720*time.Hour {
		t.Fatalf("created %+v", created)
	}
	testcheck.Within(t, "the admin's key is identified", func() bool {
		c, ok := s.Identify(created.Secret, time.Now())
		return ok && c.ID == created.ID
	})

	status, body, _ = call(t, srv, http.MethodGet, "/vigthoria/keys", "")
	infos := decode[[]keys.KeyInfo](t, body)
	if status != http.StatusOK || len(infos) != 1 || infos[0].ID != created.ID || infos[0].Secret != "" {
		t.Errorf("GET /vigthoria/keys: %d %s", status, body)
	}
	h := store.HashSecret(created.Secret)
	for _, leak := range []string{created.Secret, created.Secret[4:36], hex.EncodeToString(h[:]), base64.StdEncoding.EncodeToString(h[:])} {
		if strings.Contains(body, leak) {
			t.Errorf("the list holds a secret or hash: %s", body)
		}
	}
	status, body, _ = call(t, srv, http.MethodGet, "/vigthoria/keys/"+created.ID, "")
	if one := decode[keys.KeyInfo](t, body); status != http.StatusOK || one.ID != created.ID || strings.Contains(body, created.Secret) {
		t.Errorf("GET one key: %d %s", status, body)
	}

	status, body, _ = call(t, srv, http.MethodPost, "/vigthoria/keys/"+created.ID+"/rotate", "")
	rotated := decode[keys.KeyInfo](t, body)
	if status != http.StatusOK || !clientkey.Valid(rotated.Secret) || rotated.Secret == created.Secret || rotated.ID != created.ID {
		t.Fatalf("rotate: %d %s", status, body)
	}
	testcheck.Within(t, "rotation takes effect", func() bool {
		_, oldOK := s.Identify(created.Secret, time.Now())
		_, newOK := s.Identify(rotated.Secret, time.Now())
		return !oldOK && newOK
	})

	status, body, _ = call(t, srv, http.MethodDelete, "/vigthoria/keys/"+created.ID, "")
	if revoked := decode[keys.KeyInfo](t, body); status != http.StatusOK || revoked.State != store.StateRevoked || revoked.Revoked == nil {
		t.Errorf("DELETE: %d %s", status, body)
	}
	testcheck.Within(t, "revocation takes effect", func() bool { _, ok := s.Identify(rotated.Secret, time.Now()); return !ok })

	for _, tt := range []struct {
		name, method, path, body string
		status                   int
		allow                    string
	}{
		{"revoke again", http.MethodDelete, "/vigthoria/keys/" + created.ID, "", http.StatusOK, ""},
		{"rotate revoked", http.MethodPost, "/vigthoria/keys/" + created.ID + "/rotate", "", http.StatusConflict, ""},
		{"revoke unknown", http.MethodDelete, "/vigthoria/keys/key_unknown", "", http.StatusNotFound, ""},
		{"get unknown", http.MethodGet, "/vigthoria/keys/key_unknown", "", http.StatusNotFound, ""},
		{"rotate unknown", http.MethodPost, "/vigthoria/keys/key_unknown/rotate", "", http.StatusNotFound, ""},
		{"bad JSON", http.MethodPost, "/vigthoria/keys", `{"name":`, http.StatusBadRequest, ""},
		{"unknown field", http.MethodPost, "/vigthoria/keys", `{"name":"n","tier":"free","secret":"vgt_mine"}`, http.StatusBadRequest, ""},
		{"no name", http.MethodPost, "/vigthoria/keys", `{"tier":"free"}`, http.StatusBadRequest, ""},
		{"bad tier", http.MethodPost, "/vigthoria/keys", `{"name":"n","tier":"Pro"}`, http.StatusBadRequest, ""},
		{"bad expiry", http.MethodPost, "/vigthoria/keys", `{"name":"n","tier":"free","expires":"later"}`, http.StatusBadRequest, ""},
		{"bad mint tier", http.MethodPost, "/vigthoria/keys", `{"name":"n","tier":"pro","mint":["free","Basic"]}`, http.StatusBadRequest, ""},
		{"mint not a list", http.MethodPost, "/vigthoria/keys", `{"name":"n","tier":"pro","mint":"free,basic"}`, http.StatusBadRequest, ""},
		{"too large", http.MethodPost, "/vigthoria/keys", `{"name":"` + strings.Repeat("n", maxAdminBody) + `"}`, http.StatusBadRequest, ""},
		{"PUT keys", http.MethodPut, "/vigthoria/keys", "", http.StatusMethodNotAllowed, "GET, POST"},
		{"DELETE keys", http.MethodDelete, "/vigthoria/keys", "", http.StatusMethodNotAllowed, "GET, POST"},
		{"POST one key", http.MethodPost, "/vigthoria/keys/" + created.ID, "", http.StatusMethodNotAllowed, "GET, PATCH, DELETE"},
		{"GET rotate", http.MethodGet, "/vigthoria/keys/" + created.ID + "/rotate", "", http.StatusMethodNotAllowed, "POST"},
		{"unknown path", http.MethodGet, "/vigthoria/other", "", http.StatusNotFound, ""},
		{"too deep", http.MethodGet, "/vigthoria/keys/a/b/c", "", http.StatusNotFound, ""},
		{"empty ID", http.MethodDelete, "/vigthoria/keys/", "", http.StatusNotFound, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			status, body, header := call(t, srv, tt.method, tt.path, tt.body)
			if status != tt.status || header.Get("Allow") != tt.allow {
				t.Errorf("%s %s: %d (Allow %q) %s; want %d (Allow %q)", tt.method, tt.path, status, header.Get("Allow"), body, tt.status, tt.allow)
			}
			if status >= 400 && decode[map[string]string](t, body)["error"] == "" {
				t.Errorf("no error message: %s", body)
			}
		})
	}
	if _, body, _ := call(t, srv, http.MethodGet, "/vigthoria/keys", ""); len(decode[[]keys.KeyInfo](t, body)) != 1 {
		t.Errorf("refused creations stored keys: %s", body)
	}
}

func TestAdminCreatesMinter(t *testing.T) {
	_, cli := startService(t)
	srv := adminServer(t)
	status, body, _ := call(t, srv, http.MethodPost, "/vigthoria/keys", `{"name":"backend","tier":"pro","mint":["free","basic","free"]}`)
	if status != http.StatusCreated {
		t.Fatalf("POST /vigthoria/keys: %d %s", status, body)
	}
	created := decode[keys.KeyInfo](t, body)
	if want := []string{"basic", "free"}; !slices.Equal(created.Mint, want) {
		t.Errorf("created key mints %q, want %q", created.Mint, want)
	}
	if rec, err := cli.Get(t.Context(), created.ID); err != nil || !slices.Equal(rec.Mint, created.Mint) {
		t.Errorf("stored key mints %q (%v), want %q", rec.Mint, err, created.Mint)
	}
	_, body, _ = call(t, srv, http.MethodGet, "/vigthoria/keys/"+created.ID, "")
	if got := decode[keys.KeyInfo](t, body); !slices.Equal(got.Mint, created.Mint) {
		t.Errorf("GET shows the key minting %q, want %q", got.Mint, created.Mint)
	}

	// A key that mints nothing has no "mint" in its JSON.
	status, body, _ = call(t, srv, http.MethodPost, "/vigthoria/keys", `{"name":"plain","tier":"free","mint":[]}`)
	if status != http.StatusCreated || strings.Contains(body, `"mint"`) {
		t.Errorf("POST without mint tiers: %d %s; want 201 without \"mint\"", status, body)
	}
}

func TestAdminChoosesAmongStores(t *testing.T) {
	a, _ := startService(t)
	b, _ := startService(t)
	srv := adminServer(t)

	status, body, _ := call(t, srv, http.MethodGet, "/vigthoria/keys", "")
	if status != http.StatusBadRequest || !strings.Contains(body, "?store=") || !strings.Contains(body, a.Spec()) || !strings.Contains(body, b.Spec()) {
		t.Errorf("two stores, none chosen: %d %s; want 400 naming both and ?store=", status, body)
	}
	status, body, _ = call(t, srv, http.MethodPost, "/vigthoria/keys?store="+url.QueryEscape(b.Spec()), `{"name":"n","tier":"free"}`)
	if status != http.StatusCreated {
		t.Fatalf("POST with ?store: %d %s", status, body)
	}
	secret := decode[keys.KeyInfo](t, body).Secret
	testcheck.Within(t, "the key reaches the chosen store", func() bool { _, ok := b.Identify(secret, time.Now()); return ok })
	if _, ok := a.Identify(secret, time.Now()); ok {
		t.Error("the key reached the other store")
	}
	status, body, _ = call(t, srv, http.MethodGet, "/vigthoria/keys?store="+url.QueryEscape("sqlite:/nowhere.db"), "")
	if status != http.StatusNotFound {
		t.Errorf("unknown ?store: %d %s, want 404", status, body)
	}
	status, body, _ = call(t, srv, http.MethodGet, "/vigthoria/keys?store=bogus", "")
	if status != http.StatusBadRequest {
		t.Errorf("invalid ?store: %d %s, want 400", status, body)
	}
}

func TestAdminModule(t *testing.T) {
	mod, err := caddy.GetModule("admin.api.vigthoria")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := mod.New().(caddy.AdminRouter); !ok {
		t.Error("admin.api.vigthoria is not an AdminRouter")
	}
}

func TestAdminCreateShapesAndTiers(t *testing.T) {
	s, _ := startService(t)
	srv := adminServer(t)
	tests := []struct {
		name, body string
		status     int
		want       string // in the body
	}{
		{"flat settings", `{"name":"a","tier":"pro","concurrent":3,"models":["m-*"]}`, http.StatusCreated, `"concurrent":3`},
		{"nested settings (deprecated)", `{"name":"b","tier":"pro","settings":{"concurrent":4}}`, http.StatusCreated, `"concurrent":4`},
		{"both shapes", `{"name":"c","tier":"pro","concurrent":3,"settings":{"concurrent":4}}`, http.StatusBadRequest, "give them flat"},
		{"unknown field", `{"name":"d","tier":"pro","concurent":3}`, http.StatusBadRequest, "unknown field 'concurent'"},
		{"bad setting", `{"name":"e","tier":"pro","concurrent":"x"}`, http.StatusBadRequest, "concurrent"},
		{"unconfigured tier", `{"name":"f","tier":"prro"}`, http.StatusBadRequest, "no loaded config has the tier 'prro' (its tiers: basic, free, pro, team)"},
		{"unconfigured mint tier", `{"name":"g","tier":"pro","mint":["fre"]}`, http.StatusBadRequest, "tier 'fre'"},
		{"unconfigured tier forced", `{"name":"h","tier":"prro","force":true}`, http.StatusCreated, `"tier":"prro"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, body, _ := call(t, srv, http.MethodPost, "/vigthoria/keys", tt.body)
			if status != tt.status || !strings.Contains(body, tt.want) {
				t.Errorf("POST %s: %d %s, want %d with %q", tt.body, status, body, tt.status, tt.want)
			}
			if status == http.StatusCreated {
				// Identified as soon as the answer is back, with no wait
				// for the Service's poll.
				if _, ok := s.Identify(decode[keys.KeyInfo](t, body).Secret, time.Now()); !ok {
					t.Error("the key just created is not identified when the answer is back")
				}
			}
		})
	}
}

func TestAdminUsage(t *testing.T) {
	_, st := startService(t)
	srv := adminServer(t)
	status, body, _ := call(t, srv, http.MethodPost, "/vigthoria/keys", `{"name":"alice","tier":"pro"}`)
	if status != http.StatusCreated {
		t.Fatalf("POST: %d %s", status, body)
	}
	id := decode[keys.KeyInfo](t, body).ID
	now := time.Now().UTC()
	for _, day := range []time.Time{now, now.AddDate(0, -1, 0)} {
		if err := st.AddUsage(t.Context(), store.UsageBatch{Writer: "t" + store.Day(day), Seq: 1, Rows: []store.UsageRow{
			{Client: id, Day: store.Day(day), Model: "m", Requests: 2, PromptTokens: 10, CompletionTokens: 5, Cost: 7},
		}}); err != nil {
			t.Fatal(err)
		}
	}
	status, body, _ = call(t, srv, http.MethodGet, "/vigthoria/usage", "")
	lines := decode[[]usageLine](t, body)
	if status != http.StatusOK || len(lines) != 1 || lines[0].Name != "alice" || lines[0].Day != store.Day(now) || lines[0].TotalTokens != 15 || lines[0].CostMicros != 7 {
		t.Errorf("GET /vigthoria/usage: %d %s, want this month's one row of alice", status, body)
	}
	last := now.AddDate(0, -1, 0)
	status, body, _ = call(t, srv, http.MethodGet, "/vigthoria/usage?key="+id+"&from="+store.Day(last)+"&to="+store.Day(last), "")
	if lines := decode[[]usageLine](t, body); status != http.StatusOK || len(lines) != 1 || lines[0].Day != store.Day(last) {
		t.Errorf("GET /vigthoria/usage of a day last month: %d %s", status, body)
	}
	status, body, _ = call(t, srv, http.MethodGet, "/vigthoria/usage?from=2026-13-01", "")
	if status != http.StatusBadRequest || !strings.Contains(body, "2026-13-01") {
		t.Errorf("a bad day: %d %s, want 400 naming it", status, body)
	}
}
