package vigthoria

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

var (
	printedSecret = regexp.MustCompile(`vgt_[0-9A-Za-z]{38}`)
	printedID     = regexp.MustCompile(`key_[0-9A-Za-z]{16}`)
)

// runCLI runs RunCLI and returns its exit status and outputs.
func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := RunCLI(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// mustCLI runs RunCLI and fails the test unless it succeeds.
func mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errOut := runCLI(t, args...)
	if code != 0 {
		t.Fatalf("vigthoria %s: exit %d: %s", strings.Join(args, " "), code, errOut)
	}
	return out
}

func TestCLIRoundTrip(t *testing.T) {
	s, _ := startService(t)
	store := "--store=" + s.Spec()

	out := mustCLI(t, "key", "add", "--tier", "pro", "--name", "alice smith", "--expires", "720h", store)
	secret, id := printedSecret.FindString(out), printedID.FindString(out)
	if secret == "" || id == "" || !strings.Contains(out, "shown only now") {
		t.Fatalf("add printed %q, want the ID, the secret and that it is shown once", out)
	}
	testcheck.Within(t, "the CLI's key is identified", func() bool {
		c, ok := s.Identify(secret, time.Now())
		return ok && c == caller.Client{ID: id, Name: "alice smith", Tier: "pro"}
	})

	list := mustCLI(t, "key", "list", store)
	if !strings.Contains(list, id) || !strings.Contains(list, "alice smith") || !strings.Contains(list, "active") {
		t.Errorf("list = %q, want the key, active", list)
	}
	if printedSecret.MatchString(list) || strings.Contains(list, secret[4:20]) {
		t.Errorf("list shows a secret: %q", list)
	}

	out = mustCLI(t, "key", "rotate", id, store)
	newSecret := printedSecret.FindString(out)
	if newSecret == "" || newSecret == secret {
		t.Fatalf("rotate printed %q, want a new secret", out)
	}
	testcheck.Within(t, "the rotation is seen", func() bool {
		_, oldOK := s.Identify(secret, time.Now())
		_, newOK := s.Identify(newSecret, time.Now())
		return !oldOK && newOK
	})

	mustCLI(t, "key", "revoke", store, id) // flags before or after arguments
	testcheck.Within(t, "the revocation is seen", func() bool {
		_, ok := s.Identify(newSecret, time.Now())
		return !ok
	})
	if list := mustCLI(t, "key", "list", store); !strings.Contains(list, "revoked") {
		t.Errorf("list = %q, want the key revoked", list)
	}
	if code, _, errOut := runCLI(t, "key", "rotate", id, store); code == 0 || !strings.Contains(errOut, "revoked") {
		t.Errorf("rotating a revoked key: exit %d, %q", code, errOut)
	}
}

func TestCLIErrors(t *testing.T) {
	dir := t.TempDir()
	store := "--store=sqlite:" + filepath.Join(dir, "keys.db")
	missing := "--store=sqlite:" + filepath.Join(dir, "nope.db")
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no tier", []string{"key", "add", "--name", "n", store}, "tier"},
		{"no name", []string{"key", "add", "--tier", "free", store}, "name"},
		{"bad tier", []string{"key", "add", "--tier", "Free!", "--name", "n", store}, "tier"},
		{"bad expiry", []string{"key", "add", "--tier", "free", "--name", "n", "--expires", "soon", store}, "expiry"},
		{"bad mint tier", []string{"key", "add", "--tier", "pro", "--name", "n", "--mint", "free,Basic", store}, "mint tier"},
		{"empty mint tier", []string{"key", "add", "--tier", "pro", "--name", "n", "--mint", "free,,basic", store}, "mint tier"},
		{"negative expiry", []string{"key", "add", "--tier", "free", "--name", "n", "--expires", "-1h", store}, "expiry"},
		{"past date", []string{"key", "add", "--tier", "free", "--name", "n", "--expires", "2001-01-01T00:00:00Z", store}, "future"},
		{"unknown store kind", []string{"key", "list", "--store", "mysql://x"}, "unknown key store"},
		{"redis unreachable", []string{"key", "list", "--store", "redis://127.0.0.1:1/0"}, "connection refused"},
		{"list of a missing file", []string{"key", "list", missing}, "no key store at"},
		{"revoke unknown", []string{"key", "revoke", "key_nope", store}, "no such key"},
		{"rotate unknown", []string{"key", "rotate", "key_nope", store}, "no such key"},
		{"revoke without ID", []string{"key", "revoke", store}, "arg"},
		{"unknown subcommand", []string{"key", "frobnicate", store}, "unknown command"},
		{"unknown flag", []string{"key", "list", "--colour", store}, "unknown flag"},
	}
	// The store exists for the commands that need one.
	mustCLI(t, "key", "add", "--tier", "free", "--name", "first", store)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, out, errOut := runCLI(t, tt.args...)
			if code == 0 || !strings.Contains(errOut, tt.wantErr) {
				t.Errorf("exit %d, stderr %q; want failure saying %q", code, errOut, tt.wantErr)
			}
			if printedSecret.MatchString(out) {
				t.Errorf("a failed command printed a secret: %q", out)
			}
		})
	}
	if list := mustCLI(t, "key", "list", store); strings.Count(list, "key_") != 1 {
		t.Errorf("failed adds stored keys: %q", list)
	}
}

func TestCLIMint(t *testing.T) {
	store := "--store=sqlite:" + filepath.Join(t.TempDir(), "keys.db")
	out := mustCLI(t, "key", "add", "--tier", "pro", "--name", "backend", "--mint", "free,basic", store)
	minter := printedID.FindString(out)
	if !strings.Contains(out, "mints basic,free") {
		t.Errorf("add printed %q, want the tiers it mints", out)
	}
	out = mustCLI(t, "key", "add", "--tier", "free", "--name", "plain", store)
	plain := printedID.FindString(out)
	if !strings.Contains(out, "mints no tokens") {
		t.Errorf("add printed %q, want that the key mints no tokens", out)
	}

	lines := strings.Split(strings.TrimSpace(mustCLI(t, "key", "list", store)), "\n")
	if len(lines) != 3 {
		t.Fatalf("list printed %q, want a header and 2 keys", lines)
	}
	if got, want := strings.Fields(lines[0]), []string{"ID", "NAME", "TIER", "MINT", "CREATED", "EXPIRES", "LAST", "USED", "STATE", "SETTINGS"}; !slices.Equal(got, want) {
		t.Errorf("header %q, want %q", got, want)
	}
	for _, tt := range []struct {
		id, name, tier, mint string
	}{
		{minter, "backend", "pro", "basic,free"},
		{plain, "plain", "free", "-"},
	} {
		i := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, tt.id) })
		if i < 0 {
			t.Errorf("list has no line of %s: %q", tt.id, lines)
			continue
		}
		if got, want := strings.Fields(lines[i])[:4], []string{tt.id, tt.name, tt.tier, tt.mint}; !slices.Equal(got, want) {
			t.Errorf("line of %s starts %q, want %q", tt.name, got, want)
		}
	}
}

// storeWithUsage makes a store with one key, added by the CLI, and row as
// its usage today; it returns the CLI's --store flag and the key's ID.
func storeWithUsage(t *testing.T, row store.UsageRow) (flag, id string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys.db")
	flag = "--store=sqlite:" + path
	mustCLI(t, "key", "add", "--tier", "free", "--name", "n", flag)
	id = printedID.FindString(mustCLI(t, "key", "list", flag))
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	row.Client, row.Day = id, store.Day(time.Now())
	err = st.AddUsage(t.Context(), store.UsageBatch{Rows: []store.UsageRow{row}})
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	return flag, id
}

func TestCLIUsageAndEmptyList(t *testing.T) {
	flag, id := storeWithUsage(t, store.UsageRow{Model: "m-1", Requests: 2, PromptTokens: 10, CompletionTokens: 5, CachedTokens: 8, ReasoningTokens: 3, Cost: 12_000_345})
	day := store.Day(time.Now())
	for _, args := range [][]string{{"usage", flag}, {"usage", id, flag}} {
		out := mustCLI(t, args...)
		header, row, _ := strings.Cut(out, "\n")
		if got, want := strings.Fields(header), []string{"KEY", "DAY", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "REASONING", "TOTAL", "COST", "NAME"}; !slices.Equal(got, want) {
			t.Errorf("%v printed the header %q, want %q", args, got, want)
		}
		if got, want := strings.Fields(row), []string{id, day, "m-1", "2", "10", "8", "5", "3", "15", "12.000345", "n"}; !slices.Equal(got, want) {
			t.Errorf("%v printed the row %q, want %q", args, got, want)
		}
	}
	mustCLI(t, "key", "revoke", id, flag)
	mustCLI(t, "key", "revoke", id, flag) // again: nothing to do, no error
}

// TestCLIUsageEscapes checks that a model name holding control characters
// (one an older proxy let into the ledger) cannot forge a row or move the
// terminal's cursor in what the CLI prints.
func TestCLIUsageEscapes(t *testing.T) {
	forged := "m\x1b[2K\rkey_FAKEFAKEFAKEFAKE\t2026-01-01\tm\t1\t1\t1\t2\n"
	store, _ := storeWithUsage(t, store.UsageRow{Model: forged, Requests: 1})
	out := mustCLI(t, "usage", store)
	if strings.ContainsAny(out, "\x1b\r") || strings.Count(out, "\n") != 2 || strings.Contains(out, "\nkey_FAKE") {
		t.Errorf("usage printed %q: the model name forged output", out)
	}
}

// TestCLIWithoutCaddyOrStore checks that, with no Caddy to talk to and
// no --store, the key commands say both ways to the keys, rather than
// use a store of the calling user's that Caddy may not use.
func TestCLIWithoutCaddyOrStore(t *testing.T) {
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	addr := "--address=127.0.0.1:1"
	for _, args := range [][]string{
		{"key", "add", "--tier", "free", "--name", "n", addr},
		{"key", "list", addr},
		{"usage", addr},
	} {
		code, out, errOut := runCLI(t, args...)
		if code == 0 || !strings.Contains(errOut, "no Caddy admin API answers at 127.0.0.1:1") ||
			!strings.Contains(errOut, "--address") || !strings.Contains(errOut, "--store sqlite:PATH") {
			t.Errorf("%q: exit %d, %q %q; want an error naming --address and --store", args, code, out, errOut)
		}
	}
	if _, err := os.Stat(store.DefaultSQLitePath()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a store was made at the default path: %v", err)
	}
}

// startService starts a key service on a new SQLite store, and opens the
// same store as the CLI would.
func startService(t testing.TB) (*keys.Service, *sqlite.Store) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys.db")
	s, err := keys.NewService("sqlite:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	// As a config of these tiers would: the admin API refuses others.
	t.Cleanup(s.UseTiers([]string{"free", "basic", "pro", "team"}))
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	cli, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return s, cli
}
