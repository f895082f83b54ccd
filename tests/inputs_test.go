package tests

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestMintedUsersFitTheirCallerID checks that a token is minted only for
// a user whose caller ID the proxy accepts: a user of multi-byte
// characters within the old 64-character bound but past the caller ID's
// 128 bytes is refused when minting, not at every use of its token.
func TestMintedUsersFitTheirCallerID(t *testing.T) {
	e, _, key := startMinting(t, "")
	e.mintWhenKnown(t, key, map[string]any{"user": "probe", "tier": "webplus"})
	for _, c := range []struct {
		name, user string
		ok         bool
	}{
		{"102 ASCII bytes", strings.Repeat("u", 102), true},
		{"34 CJK characters (102 bytes)", strings.Repeat("用", 34), true},
		{"103 ASCII bytes", strings.Repeat("u", 103), false},
		{"36 CJK characters (108 bytes)", strings.Repeat("用", 36), false},
		{"64 emoji (256 bytes)", strings.Repeat("🙂", 64), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			res := e.mintRaw(t, key, map[string]any{"user": c.user, "tier": "webplus"})
			body, _ := io.ReadAll(res.Body)
			if !c.ok {
				if res.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "bytes") {
					t.Fatalf("minting for it: %d %s, want 400 naming the bound in bytes", res.StatusCode, body)
				}
				return
			}
			if res.StatusCode != http.StatusCreated {
				t.Fatalf("minting for it: %d %s, want 201", res.StatusCode, body)
			}
			tok := e.mint(t, key, map[string]any{"user": c.user, "tier": "webplus"})
			if s, b := e.chatStatus(t, "Bearer "+tok.Token); s != http.StatusOK {
				t.Errorf("its token's chat: %d %s, want 200", s, b)
			}
		})
	}
}

// TestManagementInputsAreStrict sends the admin API, the dashboard's key
// API and the token endpoint fields they do not know, fields in another
// case (which encoding/json would take), and values past the bounds the
// Caddyfile has: each is a 400 naming the field, and nothing changes.
func TestManagementInputsAreStrict(t *testing.T) {
	e := startDashboard(t, manyFailures, "tier app", "tier web")
	id, _ := e.addKey(t, "free")
	_, minter := e.addKey(t, "app", "--mint", "web")
	e.mintWhenKnown(t, minter, map[string]any{"user": "probe", "tier": "web"})
	admin := func(method, path, body string) (int, string) {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), method, e.caddy.AdminURL+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Origin", e.caddy.AdminURL)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	token, cookie := dashboardToken(t, e)
	dashboard := func(method, path, body string) (int, string) {
		t.Helper()
		res := e.do(t, method, "/dashboard/api/"+path, strings.NewReader(body), http.Header{
			"Authorization": {basicAuth()}, "X-Csrf-Token": {token}, "Cookie": {cookie}, "Origin": {e.caddy.URL},
			"Content-Type": {"application/json"},
		})
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	mint := func(method, path, body string) (int, string) {
		t.Helper()
		res := e.do(t, method, path, strings.NewReader(body), http.Header{
			"Authorization": {"Bearer " + minter}, "Content-Type": {"application/json"},
		})
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	apis := map[string]func(method, path, body string) (int, string){"admin": admin, "dashboard": dashboard, "tokens": mint}
	keys := map[string]string{"admin": "/vigthoria/keys", "dashboard": "keys", "tokens": "/vigthoria/tokens"}
	for _, c := range []struct {
		name, api, method, path, body string
		want                          string // in the error's message
	}{
		{"patch: case-folded nested fields", "admin", "PATCH", "/" + id, `{"budget":{"N":5,"Period":"day"}}`, `budget.N`},
		{"patch: an unknown nested field", "admin", "PATCH", "/" + id, `{"budget":{"n":5,"period":"day","every":"hour"}}`, `budget.every`},
		{"patch: a case-folded rate field", "admin", "PATCH", "/" + id, `{"requests":{"N":5,"window":"1m"}}`, `requests`},
		{"patch: a field twice", "admin", "PATCH", "/" + id, `{"max_tokens":5,"max_tokens":6}`, `max_tokens`},
		{"patch: max_tokens past any request", "admin", "PATCH", "/" + id, `{"max_tokens":9223372036854775807}`, `max_tokens`},
		{"patch: max_tokens past int64", "admin", "PATCH", "/" + id, `{"max_tokens":9223372036854775808}`, `max_tokens`},
		{"patch: an origin no browser sends", "admin", "PATCH", "/" + id, `{"origins":["https://A.example:443"]}`, `https://a.example`},
		{"create: case-folded settings", "admin", "POST", "", `{"name":"x","tier":"free","settings":{"Concurrent":2}}`, `settings.Concurrent`},
		{"create: case-folded top level", "admin", "POST", "", `{"Name":"x","tier":"free"}`, `Name`},
		{"dashboard patch: case-folded nested fields", "dashboard", "PATCH", "/" + id, `{"quota":{"N":5,"period":"day"}}`, `quota.N`},
		{"dashboard create: case-folded settings", "dashboard", "POST", "", `{"name":"x","tier":"free","settings":{"Max_Tokens":2}}`, `settings.Max_Tokens`},
		{"dashboard create: an origin no browser sends", "dashboard", "POST", "", `{"name":"x","tier":"free","settings":{"origins":["HTTPS://app.example"]}}`, `https://app.example`},
		{"tokens: a case-folded field", "tokens", "POST", "", `{"User":"alice"}`, `User`},
	} {
		t.Run(c.name, func(t *testing.T) {
			status, body := apis[c.api](c.method, keys[c.api]+c.path, c.body)
			if status != http.StatusBadRequest || !strings.Contains(body, c.want) || !strings.Contains(body, `"error"`) {
				t.Fatalf("%s %s %s: %d %s, want 400 with an error naming %s", c.method, c.path, c.body, status, body, c.want)
			}
		})
	}
	// Nothing was changed or made by the refused requests.
	if status, body := admin("GET", "/vigthoria/keys/"+id, ""); status != http.StatusOK || strings.Contains(body, `"settings"`) {
		t.Errorf("the key after the refused changes: %d %s, want it without settings", status, body)
	}
	if status, body := admin("GET", "/vigthoria/keys", ""); status != http.StatusOK || strings.Count(body, `"id"`) != 3 {
		t.Errorf("the keys after the refused creations: %d %s, want the 3 made by the test", status, body)
	}
	// What is written as documented still works.
	if status, body := admin("PATCH", "/vigthoria/keys/"+id, `{"budget":{"n":5000000,"period":"day"},"max_tokens":2147483648,"origins":["https://a.example:8443"]}`); status != http.StatusOK {
		t.Errorf("a valid patch: %d %s, want 200", status, body)
	}
}
