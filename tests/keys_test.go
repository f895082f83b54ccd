package tests

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/openai/openai-go/v3/option"
	"golang.org/x/crypto/bcrypt"

	vigthoria "github.com/vigthoria/caddy-vigthoria"
	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

var secretPattern = regexp.MustCompile(`vgt_[0-9A-Za-z]{38}`)

// manyFailures lets a test poll with keys that are not (or no longer)
// valid without the failed-authentication throttle stepping in.
const manyFailures = "auth_failures 100000/1m"

// cli runs `caddy vigthoria args…` on the test's store and returns its
// output, failing the test on a non-zero exit.
func (k *env) cli(t *testing.T, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	args = append(args, "--store", k.store)
	if code := vigthoria.RunCLI(args, &out, &errOut); code != 0 {
		t.Fatalf("caddy vigthoria %s: exit %d: %s", strings.Join(args, " "), code, errOut.String())
	}
	return out.String()
}

// addKey creates a key with the CLI and returns its ID and secret.
func (k *env) addKey(t *testing.T, tier string, more ...string) (id, secret string) {
	t.Helper()
	out := k.cli(t, append([]string{"key", "add", "--tier", tier, "--name", "test-" + tier}, more...)...)
	secret = secretPattern.FindString(out)
	id = regexp.MustCompile(`key_[0-9A-Za-z]{16}`).FindString(out)
	if secret == "" || id == "" {
		t.Fatalf("key add printed no ID or secret: %s", out)
	}
	return id, secret
}

// chatStatus sends a chat completion with exactly the given Authorization
// values, and returns the status and body.
func (e *env) chatStatus(t *testing.T, auth ...string) (int, []byte) {
	t.Helper()
	// An Authorization entry, even empty, stops do from adding the env's key.
	h := http.Header{"Content-Type": {"application/json"}, "Authorization": auth}
	res := e.do(t, http.MethodPost, "/v1/chat/completions",
		jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}), h)
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res.StatusCode, body
}

// eventually polls cond for up to one second, the promise for key changes
// made by the CLI or the admin API.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitFor(t, time.Second, what, cond)
}

// waitFor polls cond until it holds, failing the test after within.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	testcheck.WaitFor(t, within, what, cond)
}

func TestBadCredentialsAllLookTheSame(t *testing.T) {
	k := start(t, manyFailures)
	_, valid := k.addKey(t, "free")
	revokedID, revoked := k.addKey(t, "free")
	k.cli(t, "key", "revoke", revokedID)
	_, expired := k.addKey(t, "free", "--expires", "1s")
	rotatedID, rotatedOld := k.addKey(t, "pro")
	k.cli(t, "key", "rotate", rotatedID)
	unknown, err := clientkey.New()
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the valid key works", func() bool { s, _ := k.chatStatus(t, "Bearer "+valid); return s == http.StatusOK })
	time.Sleep(1100 * time.Millisecond) // the 1s key expires
	k.upstream.Reset()

	// One letter's case changed: well-formed, but the checksum fails.
	flip := []byte(valid)
	for i := 4; i < len(flip); i++ {
		if c := flip[i] | 0x20; c >= 'a' && c <= 'z' {
			flip[i] ^= 0x20
			break
		}
	}
	cases := map[string][]string{
		"no header":              nil,
		"empty header":           {""},
		"scheme only":            {"Bearer"},
		"scheme and space":       {"Bearer "},
		"lowercase scheme only":  {"bearer"},
		"basic credentials":      {"Basic dXNlcjpwYXNz"},
		"prefix only":            {"Bearer vgt_"},
		"unknown well-formed":    {"Bearer " + unknown},
		"bad checksum":           {"Bearer " + string(flip)},
		"truncated":              {"Bearer " + valid[:len(valid)-1]},
		"one char too many":      {"Bearer " + valid + "x"},
		"uppercased":             {"Bearer " + strings.ToUpper(valid)},
		"lowercased":             {"Bearer " + strings.ToLower(valid)},
		"revoked":                {"Bearer " + revoked},
		"expired":                {"Bearer " + expired},
		"rotated away":           {"Bearer " + rotatedOld},
		"openai-style key":       {"Bearer sk-proj-" + strings.Repeat("a", 40)},
		"two spaces":             {"Bearer  " + valid},
		"trailing garbage":       {"Bearer " + valid + " extra"},
		"token scheme":           {"Token " + valid},
		"basic with the key":     {"Basic " + valid},
		"no scheme":              {valid},
		"tab separator":          {"Bearer\t" + valid},
		"two headers, both good": {"Bearer " + valid, "Bearer " + valid},
		"two headers, one good":  {"Bearer " + unknown, "Bearer " + valid},
		"very long":              {"Bearer " + strings.Repeat("A", 8000)},
		"null":                   {"Bearer null"},
		"undefined":              {"Bearer undefined"},
		"key with a space":       {"Bearer " + valid[:20] + " " + valid[21:]},
		"non-base62":             {"Bearer vgt_" + strings.Repeat("-", 38)},
		"the server key":         {"Bearer " + serverKey},
		"quoted":                 {`Bearer "` + valid + `"`},
	}
	if len(cases) < 30 {
		t.Fatalf("only %d cases", len(cases))
	}
	var want []byte
	for name, auth := range cases {
		t.Run(name, func(t *testing.T) {
			status, body := k.chatStatus(t, auth...)
			if status != http.StatusUnauthorized {
				t.Fatalf("status = %d, want 401 (%s)", status, body)
			}
			if want == nil {
				want = body
				var e apiError
				if err := json.Unmarshal(body, &e); err != nil || e.Error.Code != "invalid_api_key" {
					t.Fatalf("body %s, want the invalid_api_key error", body)
				}
			}
			if !bytes.Equal(body, want) {
				t.Errorf("body = %s, want the same as every refusal: %s", body, want)
			}
		})
	}
	t.Run("other headers carry no key", func(t *testing.T) {
		for _, h := range []http.Header{
			{"X-Api-Key": {valid}, "Authorization": nil},
			{"Cookie": {"key=" + valid}, "Authorization": nil},
			{"Api-Key": {valid}, "Authorization": nil},
		} {
			res := k.do(t, http.MethodGet, "/v1/models", nil, h)
			if body, _ := io.ReadAll(res.Body); res.StatusCode != http.StatusUnauthorized || !bytes.Equal(body, want) {
				t.Errorf("%v: status %d body %s, want the 401", h, res.StatusCode, body)
			}
		}
	})
	k.wantUpstreamCalls(t, 0)
}

// TestFailedAuthenticationIsThrottled checks that the throttle stops
// further failed attempts from an address, and only those: a valid key and
// an anonymous caller from the same address (one NAT, office or CDN) are
// served while it holds.
func TestFailedAuthenticationIsThrottled(t *testing.T) {
	k := start(t, "auth_failures 3/1m", "anonymous free")
	valid := k.key
	k.upstream.Reset()
	for i := range 3 {
		if s, body := k.chatStatus(t, "Bearer vgt_wrong"); s != http.StatusUnauthorized {
			t.Fatalf("failure %d: status %d, want 401 (%s)", i+1, s, body)
		}
	}
	res := k.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader("{}"),
		http.Header{"Authorization": {"Bearer vgt_wrong"}})
	e := wantAPIError(t, res, http.StatusTooManyRequests, "too_many_failed_auth")
	if ra := res.Header.Get("Retry-After"); ra == "" || ra == "0" {
		t.Errorf("Retry-After = %q, want whole seconds until the window ends", ra)
	}
	if !strings.Contains(e.Error.Message, "seconds") {
		t.Errorf("message %q does not say how long to wait", e.Error.Message)
	}
	k.wantUpstreamCalls(t, 0)

	if s, body := k.chatStatus(t, "Bearer "+valid); s != http.StatusOK {
		t.Errorf("a valid key from the throttled address: status %d, want 200 (%s)", s, body)
	}
	res = k.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": nil})
	if res.StatusCode != http.StatusOK {
		t.Errorf("an anonymous caller from the throttled address: status %d, want 200", res.StatusCode)
	}
	if s, _ := k.chatStatus(t, "Bearer vgt_wrong"); s != http.StatusTooManyRequests {
		t.Errorf("a failed attempt after a valid one: status %d, want 429: a valid key does not lift the throttle", s)
	}
	k.wantUpstreamCalls(t, 2)
}

func TestKeyLifecycleWithoutReload(t *testing.T) {
	k := start(t, manyFailures)
	id, secret := k.addKey(t, "pro")
	client := newClient(k.caddy.URL, secret)
	eventually(t, "a new key is accepted", func() bool {
		_, err := client.Chat.Completions.New(t.Context(), chatParams("hi"))
		return err == nil
	})
	if got := k.lastRequest(t).Header.Get("Authorization"); strings.Contains(got, secret) {
		t.Error("the client key reached the upstream")
	}

	out := k.cli(t, "key", "rotate", id)
	newSecret := secretPattern.FindString(out)
	if newSecret == "" || newSecret == secret {
		t.Fatalf("rotate printed no new secret: %s", out)
	}
	eventually(t, "the rotated key is refused and the new one accepted", func() bool {
		old, _ := k.chatStatus(t, "Bearer "+secret)
		cur, _ := k.chatStatus(t, "Bearer "+newSecret)
		return old == http.StatusUnauthorized && cur == http.StatusOK
	})

	list := k.cli(t, "key", "list")
	if !strings.Contains(list, id) || secretPattern.MatchString(list) {
		t.Errorf("list = %s, want the ID and no secret", list)
	}
	k.cli(t, "key", "revoke", id)
	eventually(t, "the revoked key is refused", func() bool {
		s, _ := k.chatStatus(t, "Bearer "+newSecret)
		return s == http.StatusUnauthorized
	})
	if !strings.Contains(k.cli(t, "key", "list"), "revoked") {
		t.Error("list does not show the key as revoked")
	}

	// No secret in the database or the debug log.
	wantNowhere(t, []string{secret, newSecret}, k.caddy.LogPath, strings.TrimPrefix(k.store, "sqlite:"))
}

func TestAdminAPIManagesKeys(t *testing.T) {
	k := start(t, manyFailures)
	res, err := http.Post(k.caddy.AdminURL+"/vigthoria/keys", "application/json",
		strings.NewReader(`{"name":"from-admin","tier":"free"}`))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var created struct{ ID, Secret, Tier string }
	if err := json.NewDecoder(res.Body).Decode(&created); err != nil || res.StatusCode != http.StatusCreated {
		t.Fatalf("POST /vigthoria/keys: %d %v", res.StatusCode, err)
	}
	eventually(t, "the admin-created key is accepted", func() bool {
		s, _ := k.chatStatus(t, "Bearer "+created.Secret)
		return s == http.StatusOK
	})

	list, err := http.Get(k.caddy.AdminURL + "/vigthoria/keys")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(list.Body)
	list.Body.Close()
	if !strings.Contains(string(body), created.ID) || strings.Contains(string(body), created.Secret) {
		t.Errorf("GET /vigthoria/keys = %s, want the ID and not the secret", body)
	}

	req, _ := http.NewRequest(http.MethodPost, k.caddy.AdminURL+"/vigthoria/keys/"+created.ID+"/rotate", nil)
	req.Header.Set("Origin", k.caddy.AdminURL)
	rot, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var rotated struct{ Secret string }
	json.NewDecoder(rot.Body).Decode(&rotated)
	rot.Body.Close()
	if rotated.Secret == "" || rotated.Secret == created.Secret {
		t.Fatalf("rotate gave no new secret (status %d)", rot.StatusCode)
	}
	eventually(t, "rotation takes effect", func() bool {
		old, _ := k.chatStatus(t, "Bearer "+created.Secret)
		cur, _ := k.chatStatus(t, "Bearer "+rotated.Secret)
		return old == http.StatusUnauthorized && cur == http.StatusOK
	})

	req, _ = http.NewRequest(http.MethodDelete, k.caddy.AdminURL+"/vigthoria/keys/"+created.ID, nil)
	del, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	del.Body.Close()
	if del.StatusCode >= 300 {
		t.Fatalf("DELETE: status %d", del.StatusCode)
	}
	eventually(t, "revocation takes effect", func() bool {
		s, _ := k.chatStatus(t, "Bearer "+rotated.Secret)
		return s == http.StatusUnauthorized
	})
	wantNowhere(t, []string{created.Secret, rotated.Secret}, k.caddy.LogPath, strings.TrimPrefix(k.store, "sqlite:"))
}

func TestUnconfiguredTierIsRefused(t *testing.T) {
	k := start(t)
	_, secret := k.addKey(t, "enterprise")
	eventually(t, "the key of an unknown tier gets 403", func() bool {
		s, _ := k.chatStatus(t, "Bearer "+secret)
		return s == http.StatusForbidden
	})
	res := k.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + secret}})
	wantAPIError(t, res, http.StatusForbidden, "tier_not_configured")
	k.wantUpstreamCalls(t, 0)

	// At start, the operator is told.
	k.reload(t)
	if log := k.caddy.ReadLog(t); !strings.Contains(log, "tier that is not configured") || !strings.Contains(log, `"tier":"enterprise"`) {
		t.Error("no startup warning about keys of an unconfigured tier")
	}
}

func TestKeyInQueryIsRefusedAndNotLogged(t *testing.T) {
	k := start(t)
	_, secret := k.addKey(t, "free")
	for _, q := range []string{"?key=" + secret, "?api_key=" + secret, "?x=" + secret} {
		res := k.do(t, http.MethodGet, "/v1/models"+q, nil, http.Header{"Authorization": {"Bearer " + secret}})
		wantAPIError(t, res, http.StatusBadRequest, "key_in_query")
	}
	k.wantUpstreamCalls(t, 0)
	wantNowhere(t, []string{secret}, k.caddy.LogPath)
}

func TestIdentityFromAnotherAuthHandler(t *testing.T) {
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	hash, err := bcrypt.GenerateFromPassword([]byte("hunter2"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	c := harness.StartCaddy(t, "\tbasic_auth {\n\t\talice "+string(hash)+"\n\t}\n"+vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}",
		"store sqlite "+filepath.Join(t.TempDir(), "k.db"), "tier team", "identity {http.auth.user.id} tier team",
	))
	req, _ := http.NewRequest(http.MethodGet, c.URL+"/v1/models", nil)
	req.SetBasicAuth("alice", "hunter2")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status = %d, want 200 for an identity from basic_auth", res.StatusCode)
	}
	got := up.Requests()[0]
	if got.Header.Get("Authorization") != "Bearer "+serverKey {
		t.Error("the upstream did not get the server key in place of the caller's basic credentials")
	}
	if !c.WaitLog(t, `"user_id":"alice"`) {
		t.Error("the access log's user_id is not the identity")
	}
}

// TestCallerPlaceholders checks what the module tells the rest of Caddy
// about a caller: the placeholders, read here at logging time, and the
// access log's user_id, the key's ID and never the key.
func TestCallerPlaceholders(t *testing.T) {
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	path := filepath.Join(t.TempDir(), "k.db")
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	rec, secret, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "placeholder-app", Tier: "team"}, time.Now())
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	c := harness.StartCaddy(t, "\tlog_append caller_id {http.vigthoria.client_id}\n\tlog_append caller_name {http.vigthoria.client_name}\n"+
		"\tlog_append caller_tier {http.vigthoria.tier}\n"+
		vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store sqlite "+path, "tier team"))
	req, _ := http.NewRequest(http.MethodGet, c.URL+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+secret)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status = %d, want 200", res.StatusCode)
	}
	for _, want := range []string{`"user_id":"` + rec.ID + `"`, `"caller_id":"` + rec.ID + `"`,
		`"caller_name":"placeholder-app"`, `"caller_tier":"team"`} {
		if !c.WaitLog(t, want) {
			t.Errorf("the access log lacks %s", want)
		}
	}
	wantNowhere(t, []string{secret}, c.LogPath)
}

// TestAnonymousTier: a caller without credentials gets the anonymous
// tier, by the handler's option or the registered source of the same
// name, which are one source; giving both is a config error.
func TestAnonymousTier(t *testing.T) {
	for _, option := range []string{"anonymous free", "source anonymous free"} {
		t.Run(option, func(t *testing.T) {
			k := start(t, option)
			if s, body := k.chatStatus(t); s != http.StatusOK {
				t.Fatalf("keyless caller: status %d (%s), want 200", s, body)
			}
			// A wrong key is still a failure, not a free pass.
			if s, _ := k.chatStatus(t, "Bearer vgt_nope"); s != http.StatusUnauthorized {
				t.Errorf("wrong key with anonymous on: status %d, want 401", s)
			}
			if !k.caddy.WaitLog(t, `"user_id":"ip:127.0.0.1"`) {
				t.Error("the access log does not name the anonymous caller by address")
			}
		})
	}
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	cfg, err := harness.Adapt("{\n\tadmin off\n}\n\nhttp://127.0.0.1:1 {\n" +
		vigthoriaBlock("http://127.0.0.1:1/v1", "{env.VIGTHORIA_TEST_KEY}", "store sqlite "+filepath.Join(t.TempDir(), "keys.db"),
			"tier free", "tier pro", "anonymous free", "source anonymous pro") + "\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	var c caddy.Config
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(&c); err == nil || !strings.Contains(err.Error(), "anonymous callers are given a tier twice") {
		t.Errorf("anonymous option and source both: %v, want a config error", err)
	}
}

func TestValidateWritesNothing(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "keys.db")
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	cfg, err := harness.Adapt("{\n\tadmin off\n}\n\nhttp://127.0.0.1:1 {\n" +
		vigthoriaBlock("http://127.0.0.1:1/v1", "{env.VIGTHORIA_TEST_KEY}", "store sqlite "+path, "tier free") + "\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	var c caddy.Config
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(&c); err != nil {
		t.Fatalf("validate: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "sub")); !os.IsNotExist(err) {
		t.Errorf("validating created %s (err %v)", filepath.Join(dir, "sub"), err)
	}
}

func TestReloadKeepsKeysWorking(t *testing.T) {
	k := start(t, manyFailures)
	_, secret := k.addKey(t, "free")
	eventually(t, "the key works", func() bool { s, _ := k.chatStatus(t, "Bearer "+secret); return s == http.StatusOK })
	client := newClient(k.caddy.URL, secret)
	for i := range 3 {
		k.reload(t, manyFailures, "max_body "+strconv.Itoa(i+1)+"MB")
		// A connection the old server held may close under the first
		// request after a reload, before it reaches any handler: the
		// client library's own retry covers that.
		if _, err := client.Chat.Completions.New(t.Context(), chatParams("after reload"), option.WithMaxRetries(2)); err != nil {
			t.Fatalf("after reload %d: %v", i, err)
		}
	}
	_, later := k.addKey(t, "pro")
	eventually(t, "a key added after reloads is seen", func() bool { s, _ := k.chatStatus(t, "Bearer "+later); return s == http.StatusOK })
}

// wantNowhere asserts that no secret, whole or its last 8 characters,
// appears in the files (a database's -wal and -shm files included).
func wantNowhere(t *testing.T, secrets []string, files ...string) {
	t.Helper()
	for _, f := range files {
		for _, path := range []string{f, f + "-wal", f + "-shm"} {
			b, err := os.ReadFile(path)
			if err != nil {
				continue
			}
			for _, s := range secrets {
				if bytes.Contains(b, []byte(s)) || bytes.Contains(b, []byte(s[len(s)-8:])) {
					t.Errorf("a secret appears in %s", filepath.Base(path))
				}
			}
		}
	}
}
