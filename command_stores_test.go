package vigthoria

import (
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/storecheck"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

func TestRedisCLIRoundTrip(t *testing.T) {
	srv := redistest.Start(t)
	const password = "s3cret-pw"
	if err := redistest.Client(t, srv.URL).ConfigSet(t.Context(), "requirepass", password).Err(); err != nil {
		t.Fatal(err)
	}
	url := "redis://:" + password + "@" + srv.Addr + "/0"
	s, err := keys.NewService(url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	store := "--store=" + url

	out := mustCLI(t, "key", "add", "--tier", "pro", "--name", "alice", store)
	secret, id := printedSecret.FindString(out), printedID.FindString(out)
	if secret == "" || id == "" || !strings.Contains(out, "redis://:xxxxx@"+srv.Addr) {
		t.Fatalf("add printed %q, want the ID, the secret and the store", out)
	}
	if strings.Contains(out, password) {
		t.Errorf("add printed the Redis password: %q", out)
	}
	testcheck.Within(t, "the CLI's key is identified", func() bool {
		c, ok := s.Identify(secret, time.Now())
		return ok && c == caller.Client{ID: id, Name: "alice", Tier: "pro"}
	})
	if list := mustCLI(t, "key", "list", store); !strings.Contains(list, id) || !strings.Contains(list, "active") {
		t.Errorf("list = %q, want the key, active", list)
	}
	newSecret := printedSecret.FindString(mustCLI(t, "key", "rotate", id, store))
	testcheck.Within(t, "the rotation is seen", func() bool { return !identified(s, secret) && identified(s, newSecret) })
	mustCLI(t, "key", "revoke", id, store)
	testcheck.Within(t, "the revocation is seen", func() bool { return !identified(s, newSecret) })
	if list := mustCLI(t, "key", "list", store); !strings.Contains(list, "revoked") {
		t.Errorf("list = %q, want the key revoked", list)
	}

	for _, tt := range []struct{ name, store, wantErr string }{
		{"wrong password", "redis://:nope@" + srv.Addr + "/0", "WRONGPASS"},
		{"unreachable", "redis://:" + password + "@127.0.0.1:1/0", "refused"},
	} {
		code, _, errOut := runCLI(t, "key", "list", "--store", tt.store)
		if code == 0 || !strings.Contains(errOut, tt.wantErr) || strings.Contains(errOut, password) {
			t.Errorf("%s: exit %d, %q; want failure saying %q, without the password", tt.name, code, errOut, tt.wantErr)
		}
	}
}

func TestCLISigningKeys(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "keys.db")
	flag := "--store=sqlite:" + path
	if code, _, errOut := runCLI(t, "signing-key", "list", flag); code == 0 || !strings.Contains(errOut, "no key store at") {
		t.Errorf("list of a missing store: exit %d, %q; want failure saying there is none", code, errOut)
	}

	// rotate makes a store, as key add does: a fleet's first signing key
	// may come before its first client key.
	fresh := "--store=sqlite:" + filepath.Join(t.TempDir(), "fresh.db")
	if out := mustCLI(t, "signing-key", "rotate", fresh); !printedSigningID.MatchString(out) {
		t.Errorf("rotate on a new store printed %q, want the new key's ID", out)
	}
	mustCLI(t, "key", "add", "--tier", "free", "--name", "n", flag)
	if list := mustCLI(t, "signing-key", "list", flag); !strings.Contains(list, "No signing keys in sqlite:"+path) {
		t.Errorf("list of a store without signing keys = %q, want that it has none", list)
	}

	// A first rotate makes the first key, which signs at once; a second
	// makes one that signs once published for signingGrace.
	var rotated []string
	for range 2 {
		out := mustCLI(t, "signing-key", "rotate", flag)
		if !strings.Contains(out, "Signing keys removed (retired more than 24 hours ago): 0.") {
			t.Errorf("rotate printed %q, want that it removed none", out)
		}
		rotated = append(rotated, printedSigningID.FindString(out))
	}
	if list := mustCLI(t, "signing-key", "list", flag); strings.Count(list, "current") != 1 || strings.Count(list, "signs from") != 1 {
		t.Errorf("list = %q, want one key current and one to sign soon", list)
	}

	// Keys from before: the oldest stopped signing more than keys.MaxTokenTTL
	// ago, the next an hour ago, and the third signs until the rotated
	// keys have been published for keys.SigningGrace.
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now()
	expired := newSigningKey(t, now.Add(-3*keys.MaxTokenTTL))
	retired := newSigningKey(t, now.Add(-2*keys.MaxTokenTTL))
	current := newSigningKey(t, now.Add(-time.Hour))
	for _, k := range []store.SigningKey{expired, retired, current} {
		if err := st.AddSigningKey(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	lines := strings.Split(strings.TrimSpace(mustCLI(t, "signing-key", "list", flag)), "\n")
	if len(lines) != 6 || !slices.Equal(strings.Fields(lines[0]), []string{"ID", "CREATED", "STATE"}) {
		t.Fatalf("list printed %q, want a header and 5 keys", lines)
	}
	for i, want := range []struct {
		id, state string
	}{
		{expired.ID, "expired"},
		{retired.ID, "retired"},
		{current.ID, "current"},
		{"", "signs"},
		{"", "signs"},
	} {
		f := strings.Fields(lines[i+1])
		if len(f) < 3 || (want.id != "" && f[0] != want.id) || f[2] != want.state {
			t.Errorf("line %d = %q, want %s %s", i+1, lines[i+1], want.id, want.state)
		}
	}
	if got, want := strings.Fields(lines[2])[2:], []string{"retired", formatTime(current.Created.Add(keys.SigningGrace), "-")}; !slices.Equal(got, want) {
		t.Errorf("the state of %s is %q, want %q", retired.ID, got, want)
	}

	out := mustCLI(t, "signing-key", "rotate", flag)
	if !strings.Contains(out, "Signing keys removed (retired more than 24 hours ago): 1.") {
		t.Errorf("rotate printed %q, want that it removed 1", out)
	}
	want := []string{retired.ID, current.ID, rotated[0], rotated[1], printedSigningID.FindString(out)}
	if got := storecheck.SigningIDs(t, st); !slices.Equal(got, want) && !slices.Equal(got, []string{want[0], want[1], want[3], want[2], want[4]}) {
		t.Errorf("signing keys %v, want %v: the expired key removed, the others kept", got, want)
	}

	// Nothing printed holds a private key.
	keys, err := st.SigningKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	printed := out + mustCLI(t, "signing-key", "list", flag)
	for _, k := range append(keys, expired) {
		storecheck.WantNoPrivate(t, "the CLI's output", printed, k)
	}
}

// identified reports whether s identifies secret now.
func identified(s *keys.Service, secret string) bool {
	_, ok := s.Identify(secret, time.Now())
	return ok
}

var printedSigningID = regexp.MustCompile(`sig_[0-9A-Za-z]{16}`)

// newSigningKey makes a signing key created at now.
func newSigningKey(t *testing.T, now time.Time) store.SigningKey {
	t.Helper()
	k, err := store.NewSigningKey(now)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
