package vigthoria

import (
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/storetest"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/policy"
)

// TestCLISettings: key add takes every setting, update changes and
// clears them, show says where each comes from, list names them, and
// a running Service sees each change.
func TestCLISettings(t *testing.T) {
	s, _ := startService(t)
	store := "--store=" + s.Spec()
	out := mustCLI(t, "key", "add", "--tier", "pro", "--name", "acme", "--requests", "100/1m", "--tokens", "200000/1m",
		"--concurrent", "5", "--quota", "10000000/month", "--budget", "50/month", "--models", "vigthoria-fast-*",
		"--max-tokens", "2048", "--origins", "https://app.acme.com", store)
	id, secret := printedID.FindString(out), printedSecret.FindString(out)
	if !strings.Contains(out, "own settings requests,tokens,concurrent,quota,budget,models,max_tokens,origins") {
		t.Errorf("add printed %q, want the settings it set", out)
	}
	testcheck.Within(t, "the key and its settings are loaded", func() bool {
		c, ok := s.Identify(secret, time.Now())
		return ok && c.Settings != nil && reflect.DeepEqual(*c.Settings, acmeSettings())
	})

	out = mustCLI(t, "key", "update", id, "--budget", "80/month", "--clear-requests", store)
	if !strings.Contains(out, "tokens,concurrent,quota,budget,models,max_tokens,origins") || strings.Contains(out, "requests,") {
		t.Errorf("update printed %q", out)
	}
	testcheck.Within(t, "the update is seen", func() bool {
		c := s.Settings(id)
		return c != nil && c.Requests == nil && c.Budget.N == 80_000_000
	})

	// The tier's values come from a config, here in JSON as Caddy keeps it.
	config := filepath.Join(t.TempDir(), "caddy.json")
	tier := `{"apps":{"http":{"servers":{"a":{"routes":[{"handle":[{"handler":"subroute","routes":[{"handle":[
		{"handler":"vigthoria","tiers":{"pro":{"requests":{"n":600,"window":60000000000},"concurrent":20}}}]}]}]}]}}}}}`
	if err := os.WriteFile(config, []byte(tier), 0o600); err != nil {
		t.Fatal(err)
	}
	show := mustCLI(t, "key", "show", id, "--config", config, store)
	for _, want := range [][]string{
		{"requests", "600/1m", "tier"},
		{"tokens", "200000/1m", "key"},
		{"concurrent", "5", "key"},
		{"budget", "80/month", "key"},
		{"models", "vigthoria-fast-*", "key"},
		{"origins", "https://app.acme.com", "key"},
	} {
		if !hasRow(show, want) {
			t.Errorf("show --config printed %q, want a row %q", show, want)
		}
	}
	mustCLI(t, "key", "update", id, "--clear-concurrent", "--clear-tokens", store)
	show = mustCLI(t, "key", "show", id, "--config", config, store)
	if !hasRow(show, []string{"concurrent", "20", "tier"}) || !hasRow(show, []string{"tokens", "none", "tier"}) {
		t.Errorf("show after clearing printed %q", show)
	}
	if show := mustCLI(t, "key", "show", id, store); !hasRow(show, []string{"requests", "(the", "tier's)", "tier"}) {
		t.Errorf("show without a config printed %q", show)
	}
	if printedSecret.MatchString(show) {
		t.Errorf("show printed a secret: %q", show)
	}
	if list := mustCLI(t, "key", "list", store); !strings.Contains(list, "quota,budget,models,max_tokens,origins") {
		t.Errorf("list = %q, want the key's settings named", list)
	}

	for _, bad := range [][]string{
		{"key", "update", id, "--budget", "50/month", "--clear-budget"},
		{"key", "update", id, "--requests", "100 per minute"},
		{"key", "update", id, "--origins", "https://app.acme.com/path"},
		{"key", "update", id, "--models", ""},
		{"key", "update", id, "--budget", "-5/month"},
		{"key", "add", "--tier", "pro", "--name", "x", "--concurrent", "0"},
		{"key", "update", "key_unknown", "--concurrent", "1"},
		{"key", "show", id, "--config", filepath.Join(t.TempDir(), "missing")},
	} {
		if code, _, errOut := runCLI(t, append(bad, store)...); code == 0 || errOut == "" {
			t.Errorf("%q: exit %d, %q; want an error", bad, code, errOut)
		}
	}
}

// acmeSettings is what the add of TestCLISettings sets.
func acmeSettings() policy.Settings {
	s := storetest.FullSettings()
	s.Tokens.Burst = 0
	s.Origins = []string{"https://app.acme.com"}
	return s
}

// hasRow reports whether out has a line of exactly the fields want.
func hasRow(out string, want []string) bool {
	for line := range strings.SplitSeq(out, "\n") {
		if reflect.DeepEqual(strings.Fields(line), want) {
			return true
		}
	}
	return false
}

// TestAdminSettings: POST takes settings, GET shows them, PATCH sets
// some and clears others, keeping the rest, and refuses bad ones.
func TestAdminSettings(t *testing.T) {
	s, _ := startService(t)
	srv := adminServer(t)
	status, body, _ := call(t, srv, http.MethodPost, "/vigthoria/keys",
		`{"name":"acme","tier":"pro","settings":{"requests":{"n":100,"window":"1m"},"origins":["https://app.acme.com"]}}`)
	if status != http.StatusCreated {
		t.Fatalf("POST: %d %s", status, body)
	}
	created := decode[keys.KeyInfo](t, body)
	if created.Settings == nil || created.Settings.Requests.N != 100 || created.Settings.Requests.Window != time.Minute {
		t.Fatalf("created %s", body)
	}
	status, body, _ = call(t, srv, http.MethodPatch, "/vigthoria/keys/"+created.ID,
		`{"budget":{"n":80000000,"period":"month"},"requests":null,"max_tokens":2048}`)
	patched := decode[keys.KeyInfo](t, body)
	if status != http.StatusOK || patched.Settings == nil || patched.Settings.Requests != nil ||
		patched.Settings.Budget.N != 80_000_000 || *patched.Settings.MaxTokens != 2048 ||
		!reflect.DeepEqual(patched.Settings.Origins, []string{"https://app.acme.com"}) {
		t.Fatalf("PATCH: %d %s", status, body)
	}
	testcheck.Within(t, "the PATCH is seen", func() bool { c := s.Settings(created.ID); return c != nil && c.Budget != nil })
	status, body, _ = call(t, srv, http.MethodGet, "/vigthoria/keys/"+created.ID, "")
	if got := decode[keys.KeyInfo](t, body); status != http.StatusOK || !reflect.DeepEqual(got.Settings, patched.Settings) {
		t.Errorf("GET after PATCH: %d %s", status, body)
	}
	for _, bad := range []string{`{"concurrent":0}`, `{"colour":"red"}`, `{"origins":["nope"]}`, `{"requests":"100/1m"}`, `[]`} {
		if status, body, _ := call(t, srv, http.MethodPatch, "/vigthoria/keys/"+created.ID, bad); status != http.StatusBadRequest {
			t.Errorf("PATCH %s: %d %s, want 400", bad, status, body)
		}
	}
	status, body, _ = call(t, srv, http.MethodPatch, "/vigthoria/keys/"+created.ID,
		`{"budget":null,"max_tokens":null,"origins":null}`)
	if got := decode[keys.KeyInfo](t, body); status != http.StatusOK || got.Settings != nil {
		t.Errorf("clearing every setting: %d %s, want no settings", status, body)
	}
	if status, _, _ := call(t, srv, http.MethodPatch, "/vigthoria/keys/key_unknown", `{}`); status != http.StatusNotFound {
		t.Errorf("PATCH of an unknown key: %d, want 404", status)
	}
}
