package sqlite

import (
	"bytes"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/storetest"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// openTemp opens a new SQLite store in a fresh directory and closes it at
// the end of the test.
func openTemp(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sub", "keys.db")
	st, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, path
}

func TestOpenSQLiteCreatesPrivateFiles(t *testing.T) {
	st, path := openTemp(t)
	storetest.Create(t, st, "a", "free", time.Time{}, time.Now())
	if fi, err := os.Stat(filepath.Dir(path)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("directory: %v, mode %v; want 0700", err, fi.Mode().Perm())
	}
	for _, p := range []string{path, path + "-wal"} {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, mode %v; want 0600", filepath.Base(p), err, fi.Mode().Perm())
		}
	}
	if st.Path() != path {
		t.Errorf("Path() = %q, want %q", st.Path(), path)
	}
}

func TestSQLiteSchema(t *testing.T) {
	st, path := openTemp(t)
	var version int
	var mode string
	if err := st.DB().QueryRow("PRAGMA user_version").Scan(&version); err != nil {
		t.Fatal(err)
	}
	if err := st.DB().QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil {
		t.Fatal(err)
	}
	if version != len(migrations) || mode != "wal" {
		t.Errorf("user_version %d, journal_mode %q; want %d, wal", version, mode, len(migrations))
	}
	for pragma, want := range map[string]int{"busy_timeout": 5000, "foreign_keys": 1, "synchronous": 1} {
		var got int
		if err := st.DB().QueryRow("PRAGMA " + pragma).Scan(&got); err != nil || got != want {
			t.Errorf("PRAGMA %s = %d (%v), want %d", pragma, got, err, want)
		}
	}

	// Opening again migrates nothing.
	again, err := Open(path)
	if err != nil {
		t.Fatalf("reopening: %v", err)
	}
	again.Close()
}

// TestSQLiteNewerSchemaRefused opens a store that a newer build has
// migrated past this one's migrations: the open fails, naming both
// versions and the fix, and leaves the file as it was.
func TestSQLiteNewerSchemaRefused(t *testing.T) {
	st, path := openTemp(t)
	newer := len(migrations) + 1
	if _, err := st.DB().Exec(fmt.Sprintf("PRAGMA user_version = %d", newer)); err != nil {
		t.Fatal(err)
	}
	again, err := Open(path)
	if err == nil {
		again.Close()
		t.Fatalf("opened a store of schema version %d with a build that knows %d", newer, len(migrations))
	}
	for _, want := range []string{
		path,
		fmt.Sprintf("schema version %d is newer", newer),
		fmt.Sprintf("knows (version %d)", len(migrations)),
		"run that build or a later one",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	var version int
	if err := st.DB().QueryRow("PRAGMA user_version").Scan(&version); err != nil || version != newer {
		t.Errorf("user_version after the refused open: %d (%v), want %d untouched", version, err, newer)
	}
}

// storeOfVersion makes an SQLite file of the schema version given,
// holding one key inserted by insert with args at seq 1, and returns its
// path.
func storeOfVersion(t *testing.T, version int, insert string, args ...any) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys.db")
	old, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range migrations[:version] {
		if _, err := old.Exec(m); err != nil {
			t.Fatal(err)
		}
	}
	_, err = old.Exec(insert+`;
		UPDATE sequences SET value = 1 WHERE name = 'keys';
		PRAGMA user_version = `+strconv.Itoa(version), args...)
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestSQLiteMigratesVersion3 opens a file of schema version 3, the last
// before mint tiers and signing keys: its keys read as minting nothing,
// and signing keys can be added.
func TestSQLiteMigratesVersion3(t *testing.T) {
	ctx := t.Context()
	now := store.StoredTime(time.Now())
	want := store.Record{ID: "key_0123456789abcdef", Name: "old", Tier: "pro", Hash: store.HashSecret("vgt_old"), Created: now}
	path := storeOfVersion(t, 3, `INSERT INTO keys (id, name, tier, hash, created, seq) VALUES (?, ?, ?, ?, ?, 1)`,
		want.ID, want.Name, want.Tier, want.Hash[:], store.Millis(want.Created))

	st, err := Open(path)
	if err != nil {
		t.Fatalf("opening a store of version 3: %v", err)
	}
	defer st.Close()
	var version int
	if err := st.DB().QueryRow("PRAGMA user_version").Scan(&version); err != nil || version != len(migrations) {
		t.Errorf("user_version = %d (%v), want %d", version, err, len(migrations))
	}
	got, err := st.Get(ctx, want.ID)
	if err != nil {
		t.Fatal(err)
	}
	storetest.WantRecord(t, got, want)
	recs, cursor, err := st.Changes(ctx, 0)
	if err != nil || len(recs) != 1 || cursor != 1 || recs[0].Mint != nil {
		t.Errorf("Changes(0) = %+v, %d, %v; want the old key, minting nothing, at cursor 1", recs, cursor, err)
	}
	k, err := store.NewSigningKey(now)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.AddSigningKey(ctx, k); err != nil {
		t.Errorf("adding a signing key to a migrated store: %v", err)
	}
}

func TestSQLiteLifecycle(t *testing.T) {
	ctx := t.Context()
	st, _ := openTemp(t)
	now := time.Date(2030, 1, 2, 3, 4, 5, 678_901_234, time.UTC)
	alice, _ := storetest.Create(t, st, "alice", "pro", time.Time{}, now)
	bob, _ := storetest.Create(t, st, "Bob's laptop", "free", now.Add(time.Hour), now.Add(time.Second))

	if !alice.Created.Equal(now.Truncate(time.Millisecond)) {
		t.Errorf("Created = %v, want now to the millisecond", alice.Created)
	}
	got, err := st.Get(ctx, alice.ID)
	if err != nil {
		t.Fatal(err)
	}
	storetest.WantRecord(t, got, alice)
	if _, err := st.Get(ctx, "key_unknown"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Get(unknown) = %v, want ErrNotFound", err)
	}

	list, err := st.List(ctx)
	if err != nil || len(list) != 2 {
		t.Fatalf("List = %d records, %v; want 2", len(list), err)
	}
	storetest.WantRecord(t, list[0], alice)
	storetest.WantRecord(t, list[1], bob)

	for _, tt := range []struct {
		at   time.Time
		want string
	}{
		{now, store.StateActive},
		{now.Add(time.Hour - time.Millisecond), store.StateActive},
		{now.Add(time.Hour), store.StateExpired},
	} {
		if got := bob.State(tt.at); got != tt.want {
			t.Errorf("State(%v) = %s, want %s", tt.at, got, tt.want)
		}
	}

	secret, err := keys.Rotate(ctx, st, alice.ID)
	if err != nil {
		t.Fatal(err)
	}
	rotated, _ := st.Get(ctx, alice.ID)
	if rotated.Hash != store.HashSecret(secret) || rotated.Hash == alice.Hash {
		t.Error("Rotate did not store the new secret's hash")
	}
	if _, err := keys.Rotate(ctx, st, "key_unknown"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Rotate(unknown) = %v, want ErrNotFound", err)
	}

	revokedAt := now.Add(time.Minute).Truncate(time.Millisecond)
	if err := st.Revoke(ctx, alice.ID, revokedAt); err != nil {
		t.Fatal(err)
	}
	if err := st.Revoke(ctx, alice.ID, revokedAt.Add(time.Hour)); err != nil {
		t.Errorf("revoking again: %v, want nil", err)
	}
	revoked, _ := st.Get(ctx, alice.ID)
	if !revoked.Revoked.Equal(revokedAt) || revoked.State(now) != store.StateRevoked {
		t.Errorf("revoked at %v, state %s; want the first revocation's time, revoked", revoked.Revoked, revoked.State(now))
	}
	if _, err := keys.Rotate(ctx, st, alice.ID); !errors.Is(err, store.ErrRevoked) {
		t.Errorf("Rotate(revoked) = %v, want ErrRevoked", err)
	}
	if err := st.Revoke(ctx, "key_unknown", now); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Revoke(unknown) = %v, want ErrNotFound", err)
	}
	if err := st.Revoke(ctx, bob.ID, time.Time{}); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("Revoke at the zero time = %v, want ErrInvalid", err)
	}
}

func TestCreateValidates(t *testing.T) {
	st, _ := openTemp(t)
	now := time.Now()
	seventeen := make([]string, 17)
	for i := range seventeen {
		seventeen[i] = fmt.Sprintf("t%d", i)
	}
	tests := []struct {
		name string
		a    keys.Attrs
	}{
		{"empty name", keys.Attrs{Name: "", Tier: "free"}},
		{"long name", keys.Attrs{Name: string(bytes.Repeat([]byte("n"), 65)), Tier: "free"}},
		{"control in name", keys.Attrs{Name: "a\tb", Tier: "free"}},
		{"newline in name", keys.Attrs{Name: "a\nb", Tier: "free"}},
		{"invalid UTF-8 name", keys.Attrs{Name: "a\xffb", Tier: "free"}},
		{"empty tier", keys.Attrs{Name: "n", Tier: ""}},
		{"uppercase tier", keys.Attrs{Name: "n", Tier: "Pro"}},
		{"tier with space", keys.Attrs{Name: "n", Tier: "pro plus"}},
		{"long tier", keys.Attrs{Name: "n", Tier: string(bytes.Repeat([]byte("t"), 65))}},
		{"expired already", keys.Attrs{Name: "n", Tier: "free", Expires: now.Add(-time.Second)}},
		{"expires now", keys.Attrs{Name: "n", Tier: "free", Expires: now}},
		{"uppercase mint tier", keys.Attrs{Name: "n", Tier: "pro", Mint: []string{"free", "Basic"}}},
		{"empty mint tier", keys.Attrs{Name: "n", Tier: "pro", Mint: []string{""}}},
		{"mint tier with a comma", keys.Attrs{Name: "n", Tier: "pro", Mint: []string{"free,basic"}}},
		{"long mint tier", keys.Attrs{Name: "n", Tier: "pro", Mint: []string{string(bytes.Repeat([]byte("t"), 65))}}},
		{"17 mint tiers", keys.Attrs{Name: "n", Tier: "pro", Mint: seventeen}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := keys.Create(t.Context(), st, tt.a, now); !errors.Is(err, store.ErrInvalid) {
				t.Errorf("Create = %v, want ErrInvalid", err)
			}
		})
	}
	// The limits themselves are fine; mint tiers are sorted, and repeats
	// do not count against the limit.
	storetest.Create(t, st, string(bytes.Repeat([]byte("é"), 64)), "a-z_0-9", now.Add(time.Millisecond), now)
	sixteen := append(slices.Clone(seventeen[1:]), seventeen[1:4]...)
	r, _ := storetest.CreateWith(t, st, keys.Attrs{Name: "n", Tier: "pro", Mint: sixteen}, now)
	if want := slices.Sorted(slices.Values(seventeen[1:])); !slices.Equal(r.Mint, want) {
		t.Errorf("Mint = %q, want %q", r.Mint, want)
	}
	if list, _ := st.List(t.Context()); len(list) != 2 {
		t.Errorf("%d keys stored, want only the 2 valid ones", len(list))
	}
}

func TestChanges(t *testing.T) {
	ctx := t.Context()
	st, _ := openTemp(t)
	changes := func(cursor uint64) ([]string, uint64) {
		t.Helper()
		recs, next, err := st.Changes(ctx, cursor)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, r := range recs {
			ids = append(ids, r.ID)
		}
		return ids, next
	}
	want := func(got []string, want ...string) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("changes %v, want %v", got, want)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("changes %v, want %v", got, want)
			}
		}
	}

	ids, c0 := changes(0)
	want(ids)
	if c0 != 0 {
		t.Errorf("cursor of an empty store = %d, want 0", c0)
	}
	now := time.Now()
	a, _ := storetest.Create(t, st, "a", "free", time.Time{}, now)
	b, _ := storetest.Create(t, st, "b", "free", time.Time{}, now)
	ids, c1 := changes(0)
	want(ids, a.ID, b.ID)
	ids, c2 := changes(c1)
	want(ids)
	if c2 != c1 {
		t.Errorf("cursor moved from %d to %d without changes", c1, c2)
	}

	// Rotation and revocation are changes, in their order.
	if _, err := keys.Rotate(ctx, st, a.ID); err != nil {
		t.Fatal(err)
	}
	if err := st.Revoke(ctx, b.ID, now); err != nil {
		t.Fatal(err)
	}
	ids, c3 := changes(c1)
	want(ids, a.ID, b.ID)
	if c3 <= c1 {
		t.Errorf("cursor %d after changes, want above %d", c3, c1)
	}
	c, _, _ := st.Changes(ctx, c1)
	if c[1].Revoked.IsZero() || c[0].Hash == a.Hash {
		t.Error("changes do not carry the new state")
	}

	// Revoking again, failed rotations and last use are not changes.
	if err := st.Revoke(ctx, b.ID, now); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.Rotate(ctx, st, b.ID); !errors.Is(err, store.ErrRevoked) {
		t.Fatal(err)
	}
	if err := st.TouchLastUsed(ctx, map[string]time.Time{a.ID: now}); err != nil {
		t.Fatal(err)
	}
	ids, c4 := changes(c3)
	want(ids)
	if c4 != c3 {
		t.Errorf("cursor moved from %d to %d", c3, c4)
	}

	// A first load gets every key, revoked ones too, and the same cursor.
	var loaded []string
	cursor, err := st.LoadAll(ctx, 1, func(recs []store.Record) {
		for _, r := range recs {
			loaded = append(loaded, r.ID)
		}
	})
	if err != nil || cursor != c3 {
		t.Fatalf("LoadAll: cursor %d, %v; want %d", cursor, err, c3)
	}
	want(loaded, a.ID, b.ID)
	if n, err := st.CountKeys(ctx); err != nil || n != 2 {
		t.Errorf("CountKeys = %d, %v; want 2", n, err)
	}
}

func TestTouchLastUsed(t *testing.T) {
	ctx := t.Context()
	st, _ := openTemp(t)
	now := time.Now().Truncate(time.Millisecond)
	a, _ := storetest.Create(t, st, "a", "free", time.Time{}, now)
	b, _ := storetest.Create(t, st, "b", "free", time.Time{}, now)
	if err := st.TouchLastUsed(ctx, map[string]time.Time{a.ID: now, b.ID: now.Add(-time.Hour), "key_unknown": now}); err != nil {
		t.Fatal(err)
	}
	// Never lowered.
	if err := st.TouchLastUsed(ctx, map[string]time.Time{a.ID: now.Add(-time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if err := st.TouchLastUsed(ctx, nil); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]time.Time{a.ID: now, b.ID: now.Add(-time.Hour)} {
		r, err := st.Get(ctx, id)
		if err != nil || !r.LastUsed.Equal(want) {
			t.Errorf("LastUsed of %s = %v (%v), want %v", id, r.LastUsed, err, want)
		}
	}
}

func TestSecondHandleAndReopen(t *testing.T) {
	ctx := t.Context()
	st, path := openTemp(t)
	other, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := storetest.Create(t, other, "from the CLI", "free", time.Time{}, time.Now())
	if got, err := st.Get(ctx, a.ID); err != nil {
		t.Fatalf("first handle does not see the second's key: %v", err)
	} else {
		storetest.WantRecord(t, got, a)
	}

	// Both write at once: every write waits its turn rather than failing.
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for _, h := range []*Store{st, other} {
		wg.Go(func() {
			for range 20 {
				_, _, err := keys.Create(ctx, h, keys.Attrs{Name: "concurrent", Tier: "free"}, time.Now())
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("concurrent write: %v", err)
		}
	}
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	reopened, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer reopened.Close()
	list, err := reopened.List(ctx)
	if err != nil || len(list) != 41 {
		t.Fatalf("after reopening: %d keys (%v), want 41", len(list), err)
	}
	for i := 1; i < len(list); i++ {
		if list[i].Created.Before(list[i-1].Created) {
			t.Errorf("List is not in order of creation: %v before %v", list[i-1].Created, list[i].Created)
		}
	}
	if got, err := reopened.Get(ctx, a.ID); err != nil {
		t.Errorf("after reopening: %v", err)
	} else {
		storetest.WantRecord(t, got, a)
	}
	_, cursor, err := reopened.Changes(ctx, 0)
	if err != nil || cursor != 41 {
		t.Errorf("cursor after reopening = %d (%v), want 41", cursor, err)
	}
}

func TestDatabaseHoldsNoSecret(t *testing.T) {
	st, path := openTemp(t)
	var secrets []string
	now := time.Now()
	for i := range 20 {
		r, s := storetest.Create(t, st, "k", "free", time.Time{}, now)
		secrets = append(secrets, s)
		if i%2 == 0 {
			s, err := keys.Rotate(t.Context(), st, r.ID)
			if err != nil {
				t.Fatal(err)
			}
			secrets = append(secrets, s)
		}
	}
	var files [][]byte
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, b)
	}
	if len(files[1]) == 0 {
		t.Fatal("the WAL is empty: the test would prove nothing")
	}
	for _, s := range secrets {
		for i, b := range files {
			for _, part := range []string{s, s[4:36], s[len(s)-8:], s[4:12]} {
				if bytes.Contains(b, []byte(part)) {
					t.Errorf("file %d holds %q of a secret", i, part)
				}
			}
		}
	}
	// The search looks in the right place: the hashes are there.
	last := store.HashSecret(secrets[len(secrets)-1])
	if !bytes.Contains(files[0], last[:]) && !bytes.Contains(files[1], last[:]) {
		t.Error("no file holds the hash of the last key")
	}
}

func TestOpenSQLiteErrors(t *testing.T) {
	dir := t.TempDir()
	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage.db")
	if err := os.WriteFile(garbage, bytes.Repeat([]byte("not a database "), 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"", filepath.Join(notDir, "keys.db"), garbage} {
		if st, err := Open(path); err == nil {
			st.Close()
			t.Errorf("Open(%q) succeeded", path)
		}
	}
}

func TestOddPath(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a dir?x=1#y%20", "keys.db")
	st, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	storetest.Create(t, st, "a", "free", time.Time{}, time.Now())
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the database is not at %q: %v", path, err)
	}
}

// TestSQLiteMigratesToSettings opens a file of the schema before
// settings: its keys read with zero Settings, and can be given some.
func TestSQLiteMigratesToSettings(t *testing.T) {
	ctx := t.Context()
	const before = 5
	want := store.Record{ID: "key_0123456789abcdef", Name: "old", Tier: "pro", Hash: store.HashSecret("vgt_old"),
		Created: store.StoredTime(time.Now()), Mint: []string{"free"}}
	path := storeOfVersion(t, before, `INSERT INTO keys (id, name, tier, hash, created, mint, seq) VALUES (?, ?, ?, ?, ?, 'free', 1)`,
		want.ID, want.Name, want.Tier, want.Hash[:], store.Millis(want.Created))
	st, err := Open(path)
	if err != nil {
		t.Fatalf("opening a store of version %d: %v", before, err)
	}
	defer st.Close()
	got, err := st.Get(ctx, want.ID)
	if err != nil {
		t.Fatal(err)
	}
	storetest.WantRecord(t, got, want)
	want.Settings = storetest.FullSettings()
	if err := keys.SetSettings(ctx, st, want.ID, want.Settings); err != nil {
		t.Fatal(err)
	}
	got, _ = st.Get(ctx, want.ID)
	storetest.WantRecord(t, got, want)
}

// TestDeployDocSchema keeps docs/deploy.md true: it names the schema
// version this build knows, and shows the refusal of a newer store as
// Open words it.
func TestDeployDocSchema(t *testing.T) {
	raw, err := os.ReadFile("../../docs/deploy.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := strings.Join(strings.Fields(string(raw)), " ")
	if want := fmt.Sprintf("knows schema version %d.", len(migrations)); !strings.Contains(doc, want) {
		t.Errorf("docs/deploy.md does not say %q", want)
	}
	st, path := openTemp(t)
	if _, err := st.DB().Exec(fmt.Sprintf("PRAGMA user_version = %d", len(migrations)+1)); err != nil {
		t.Fatal(err)
	}
	_, err = Open(path)
	if err == nil {
		t.Fatal("opened a newer store")
	}
	_, refusal, _ := strings.Cut(err.Error(), path+": ")
	if refusal == "" || !strings.Contains(doc, refusal) {
		t.Errorf("docs/deploy.md does not show the refusal %q", refusal)
	}
}
