package tests

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	vigthoria "github.com/vigthoria/caddy-vigthoria"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

var printedKeyID = regexp.MustCompile(`key_[0-9A-Za-z]{16}`)

// cliRun runs `caddy vigthoria args…` and returns its exit status and
// outputs.
func cliRun(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = vigthoria.RunCLI(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// adminCLI runs `caddy vigthoria args…` against the env's running Caddy,
// through its admin API, and returns its output, failing the test on a
// non-zero exit.
func (e *env) adminCLI(t *testing.T, args ...string) string {
	t.Helper()
	args = append(args, "--address", strings.TrimPrefix(e.caddy.AdminURL, "http://"))
	code, out, errOut := cliRun(args...)
	if code != 0 {
		t.Fatalf("caddy vigthoria %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

// TestCLIThroughAdminAPI checks that each key command, through the admin
// API of a running Caddy, has taken effect when it returns: no polling
// anywhere below.
func TestCLIThroughAdminAPI(t *testing.T) {
	e := start(t, manyFailures)

	out := e.adminCLI(t, "key", "add", "--tier", "pro", "--name", "cli alice", "--concurrent", "3")
	secret, id := secretPattern.FindString(out), printedKeyID.FindString(out)
	if secret == "" || id == "" || !strings.Contains(out, "applies to requests now") {
		t.Fatalf("key add printed %q, want an ID, a secret and that it applies now", out)
	}
	if s, body := e.chatStatus(t, "Bearer "+secret); s != http.StatusOK {
		t.Fatalf("the key just added: %d %s, want 200 when the command has returned", s, body)
	}
	if list := e.adminCLI(t, "key", "list"); !strings.Contains(list, id) || !strings.Contains(list, "concurrent") {
		t.Errorf("key list = %q, want the key and its own setting", list)
	}
	if show := e.adminCLI(t, "key", "show", id); !regexp.MustCompile(`(?m)^concurrent\s+3\s+key$`).MatchString(show) {
		t.Errorf("key show = %q, want concurrent 3 from the key", show)
	}
	if upd := e.adminCLI(t, "key", "update", id, "--clear-concurrent", "--max-tokens", "64"); !strings.Contains(upd, "own settings are max_tokens") {
		t.Errorf("key update printed %q", upd)
	}

	// usage through the admin API holds the request just answered: Caddy
	// writes its ledger first.
	var rows []struct {
		Key, Name, Day, Model string
		Requests              int64
	}
	js := e.adminCLI(t, "usage", id, "--json")
	if err := json.Unmarshal([]byte(js), &rows); err != nil {
		t.Fatalf("usage --json printed %q: %v", js, err)
	}
	if len(rows) != 1 || rows[0].Key != id || rows[0].Name != "cli alice" || rows[0].Model != model || rows[0].Requests != 1 {
		t.Errorf("usage --json = %+v, want the one request of %s, named", rows, id)
	}
	if table := e.adminCLI(t, "usage", "--day", rows[0].Day); !regexp.MustCompile(`(?m)^` + id + `\s+` + rows[0].Day + `\s+` + model + `\s+1\s.*cli alice$`).MatchString(table) {
		t.Errorf("usage --day %s = %q, want the key's row with its name", rows[0].Day, table)
	}
	if table := e.adminCLI(t, "usage", "--month", "2001-01"); strings.Count(table, "\n") != 1 {
		t.Errorf("usage of a month without use = %q, want the header alone", table)
	}

	out = e.adminCLI(t, "key", "rotate", id)
	rotated := secretPattern.FindString(out)
	if s, _ := e.chatStatus(t, "Bearer "+secret); s != http.StatusUnauthorized {
		t.Errorf("the old secret after rotate: %d, want 401 when the command has returned", s)
	}
	if s, _ := e.chatStatus(t, "Bearer "+rotated); s != http.StatusOK {
		t.Errorf("the new secret after rotate: %d, want 200 when the command has returned", s)
	}
	e.adminCLI(t, "key", "revoke", id)
	if s, _ := e.chatStatus(t, "Bearer "+rotated); s != http.StatusUnauthorized {
		t.Errorf("a revoked key: %d, want 401 when the command has returned", s)
	}
}

func TestCLITierCheckedByRunningCaddy(t *testing.T) {
	e := start(t)
	addr := strings.TrimPrefix(e.caddy.AdminURL, "http://")
	for _, args := range [][]string{
		{"key", "add", "--tier", "prro", "--name", "typo"},
		{"key", "add", "--tier", "pro", "--name", "typo", "--mint", "fre"},
	} {
		code, out, errOut := cliRun(append(args, "--address", addr)...)
		if code == 0 || !strings.Contains(errOut, "no loaded config has the tier") || !strings.Contains(errOut, "free, pro") || !strings.Contains(errOut, "--force") {
			t.Errorf("%q: exit %d, %q %q; want the tier refused, the configured ones named and --force", args, code, out, errOut)
		}
	}
	if list := e.adminCLI(t, "key", "list"); strings.Contains(list, "typo") {
		t.Errorf("a refused key was stored: %q", list)
	}

	out := e.adminCLI(t, "key", "add", "--tier", "prro", "--name", "forced", "--force")
	secret := secretPattern.FindString(out)
	res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + secret}})
	wantAPIError(t, res, http.StatusForbidden, "tier_not_configured")
}

// TestCLIFindsAdminFromConfig checks that --config gives the admin
// address, as it does to caddy reload.
func TestCLIFindsAdminFromConfig(t *testing.T) {
	e := start(t)
	lines := []string{"store " + strings.Replace(e.store, ":", " ", 1), "tier free", "tier pro"}
	config := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(config, []byte(e.caddy.Caddyfile(vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...))), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := cliRun("key", "add", "--tier", "free", "--name", "via-config", "--config", config)
	if code != 0 {
		t.Fatalf("key add --config: exit %d: %s", code, errOut)
	}
	if s, _ := e.chatStatus(t, "Bearer "+secretPattern.FindString(out)); s != http.StatusOK {
		t.Errorf("the key added through the config's admin address: %d, want 200", s)
	}
}

// TestCLIOffline checks that --store still works without the admin API
// (the running Caddy picks the key up within a second), that --config
// checks the tier offline, and that no Caddy and no --store is an error
// saying both ways.
func TestCLIOffline(t *testing.T) {
	e := start(t)
	out := e.cli(t, "key", "add", "--tier", "pro", "--name", "offline")
	secret := secretPattern.FindString(out)
	eventually(t, "a key added to the store directly is accepted", func() bool {
		s, _ := e.chatStatus(t, "Bearer "+secret)
		return s == http.StatusOK
	})
	// Offline, the running Caddy's ledger reaches the store once a second.
	waitFor(t, 3*time.Second, "usage --store shows the request with the key's name", func() bool {
		return strings.Contains(e.cli(t, "usage", printedKeyID.FindString(out)), "offline")
	})

	config := filepath.Join(t.TempDir(), "Caddyfile")
	lines := []string{"store " + strings.Replace(e.store, ":", " ", 1), "tier free", "tier pro"}
	if err := os.WriteFile(config, []byte(e.caddy.Caddyfile(vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...))), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := cliRun("key", "add", "--tier", "prro", "--name", "x", "--store", e.store, "--config", config)
	if code == 0 || !strings.Contains(errOut, "has no tier 'prro'") {
		t.Errorf("offline add of a tier the --config lacks: exit %d, %q; want it refused", code, errOut)
	}

	code, _, errOut = cliRun("key", "list", "--address", "127.0.0.1:1")
	if code == 0 || !strings.Contains(errOut, "--address") || !strings.Contains(errOut, "--store") {
		t.Errorf("no Caddy and no --store: exit %d, %q; want an error naming both ways", code, errOut)
	}

	if os.Geteuid() == 0 {
		fresh := "sqlite:" + filepath.Join(t.TempDir(), "fresh.db")
		code, _, errOut = cliRun("key", "add", "--tier", "pro", "--name", "root", "--store", fresh)
		if code != 0 || !strings.Contains(errOut, "as root") || !strings.Contains(errOut, "sudo -u caddy") {
			t.Errorf("a new store made as root: exit %d, %q; want a warning saying what to run", code, errOut)
		}
	}
}

// TestCLIStoreOfARunningCaddy: `--store` with `--address` names a store
// of the running Caddy, Redis' as well as SQLite's, by an ID: Caddy's
// admin API logs every request's URI and headers, and the Redis URL's
// password is in none of its lines.
func TestCLIStoreOfARunningCaddy(t *testing.T) {
	const password = "s3cretRedisPassw0rd"
	t.Cleanup(http.DefaultClient.CloseIdleConnections) // the CLI's, once Caddy stopped
	rs := redistest.StartWith(t, "--user", "vig", "on", ">"+password, "~*", "&*", "+@all")
	url := "redis://vig:" + password + "@" + rs.Addr + "/0"
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	c := harness.StartCaddy(t, vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store redis "+url, "tier pro"))
	admin := strings.TrimPrefix(c.AdminURL, "http://")
	if code, out, errOut := cliRun("key", "add", "--tier", "pro", "--name", "ci", "--store", url, "--address", admin); code != 0 {
		t.Fatalf("key add through the admin API: exit %d: %s %s", code, out, errOut)
	}
	code, out, errOut := cliRun("key", "list", "--store", url, "--address", admin)
	if code != 0 || !strings.Contains(out, "ci") {
		t.Fatalf("key list through the admin API: exit %d: %s %s", code, out, errOut)
	}
	c.WaitLog(t, `"uri":"/vigthoria/keys`)
	for l := range strings.Lines(c.ReadLog(t)) {
		if strings.Contains(l, password) {
			t.Errorf("Caddy's log holds the store's password: %.300s", l)
		}
	}
}
