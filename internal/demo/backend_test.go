package demo

import (
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestBackend checks the demo backend against a stand-in for the proxy's
// POST /vigthoria/tokens: a sign-in becomes a mint with the backend's key,
// tier and ttl; the proxy's answers, refusals included, come back as they
// were; a bad sign-in is refused without a call to the proxy.
func TestBackend(t *testing.T) {
	var got []map[string]string
	status, answer := http.StatusCreated, `{"token":"t","expires_at":1,"user":"alice","tier":"free"}`
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body map[string]string
		json.NewDecoder(r.Body).Decode(&body)
		body["path"], body["auth"] = r.URL.Path, r.Header.Get("Authorization")
		got = append(got, body)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, answer)
	}))
	defer proxy.Close()
	backend := Backend(BackendConfig{APIBase: proxy.URL + "/", MintKey: "vgt_secret", Tier: "free", TTL: 90 * time.Second})

	signIn := func(method, path, contentType, body string) (int, string) {
		t.Helper()
		r := httptest.NewRequest(method, path, strings.NewReader(body))
		r.Header.Set("Content-Type", contentType)
		w := httptest.NewRecorder()
		backend.ServeHTTP(w, r)
		return w.Code, w.Body.String()
	}

	code, body := signIn("POST", TokenPath, "application/json", `{"user":"alice"}`)
	if code != http.StatusCreated || body != answer {
		t.Errorf("sign-in answered %d %s, want the proxy's 201 %s", code, body, answer)
	}
	want := map[string]string{"path": "/vigthoria/tokens", "auth": "Bearer vgt_secret", "user": "alice", "tier": "free", "ttl": "1m30s"}
	if len(got) != 1 || !maps.Equal(got[0], want) {
		t.Errorf("the proxy got %v, want %v", got, want)
	}

	status, answer = http.StatusForbidden, `{"error":{"message":"no","type":"permission_error","code":"tier_not_mintable"}}`
	if code, body := signIn("POST", TokenPath, "application/json", `{"user":"bob"}`); code != status || body != answer {
		t.Errorf("a refused mint answered %d %s, want the proxy's %d %s", code, body, status, answer)
	}

	for _, c := range []struct {
		name, method, path, contentType, body string
		code                                  int
	}{
		{"no user", "POST", TokenPath, "application/json", `{}`, http.StatusBadRequest},
		{"a user too long", "POST", TokenPath, "application/json", `{"user":"` + strings.Repeat("é", 65) + `"}`, http.StatusBadRequest},
		{"a control character", "POST", TokenPath, "application/json", `{"user":"a\nb"}`, http.StatusBadRequest},
		{"not JSON", "POST", TokenPath, "application/json", `user=alice`, http.StatusBadRequest},
		{"a form", "POST", TokenPath, "application/x-www-form-urlencoded", `{"user":"alice"}`, http.StatusUnsupportedMediaType},
		{"GET", "GET", TokenPath, "application/json", ``, http.StatusMethodNotAllowed},
		{"another path", "POST", "/api/other", "application/json", `{"user":"alice"}`, http.StatusNotFound},
	} {
		calls := len(got)
		code, body := signIn(c.method, c.path, c.contentType, c.body)
		var e struct {
			Error struct{ Message, Type, Code string }
		}
		if code != c.code || json.Unmarshal([]byte(body), &e) != nil || e.Error.Code == "" {
			t.Errorf("%s: answered %d %s, want %d in the API's error shape", c.name, code, body, c.code)
		}
		if len(got) != calls {
			t.Errorf("%s: the backend called the proxy", c.name)
		}
	}
}
