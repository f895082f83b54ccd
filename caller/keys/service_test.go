package keys

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// countingStore counts the last-used writes that reach its Store.
type countingStore struct {
	store.Backend
	mu      sync.Mutex
	touches []map[string]time.Time
}

func (c *countingStore) TouchLastUsed(ctx context.Context, used map[string]time.Time) error {
	c.mu.Lock()
	c.touches = append(c.touches, maps.Clone(used))
	c.mu.Unlock()
	return c.Backend.TouchLastUsed(ctx, used)
}

func (c *countingStore) writes() []map[string]time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.touches)
}

// startService starts a Service on a new SQLite file, polling every 20ms,
// and stops it at the end of the test. It returns a second handle on the
// same file, as the CLI would have.
func startService(t testing.TB, setup func(*Service)) (*Service, *sqlite.Store) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys.db")
	s, err := NewService("sqlite:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.poll = 20 * time.Millisecond
	if setup != nil {
		setup(s)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
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

func TestServiceSeesChangesMadeElsewhere(t *testing.T) {
	s, cli := startService(t, nil)
	ctx := t.Context()
	now := time.Now()
	rec, secret := create(t, cli, "alice", "pro", time.Time{}, now)
	testcheck.Within(t, "a new key is identified", func() bool {
		_, ok := s.Identify(secret, time.Now())
		return ok
	})
	c, _ := s.Identify(secret, time.Now())
	if c != (caller.Client{ID: rec.ID, Name: "alice", Tier: "pro"}) {
		t.Errorf("Identify = %+v", c)
	}

	newSecret, err := Rotate(ctx, cli, rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "rotation takes effect", func() bool {
		_, oldOK := s.Identify(secret, time.Now())
		_, newOK := s.Identify(newSecret, time.Now())
		return !oldOK && newOK
	})

	if err := cli.Revoke(ctx, rec.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "revocation takes effect", func() bool {
		_, ok := s.Identify(newSecret, time.Now())
		return !ok
	})
}

func TestServiceLoadsExistingKeysAndExpires(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.db")
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	_, forever := create(t, st, "forever", "free", time.Time{}, now)
	_, hour := create(t, st, "an hour", "pro", now.Add(time.Hour), now)
	revoked, revokedSecret := create(t, st, "revoked", "free", time.Time{}, now)
	if err := st.Revoke(t.Context(), revoked.ID, now); err != nil {
		t.Fatal(err)
	}
	st.Close()

	s, err := NewService("sqlite:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	for _, tt := range []struct {
		name, secret string
		at           time.Time
		want         bool
	}{
		{"live", forever, now, true},
		{"live much later", forever, now.Add(1000 * time.Hour), true},
		{"before expiry", hour, now.Add(59 * time.Minute), true},
		{"at expiry", hour, now.Add(time.Hour), false},
		{"after expiry", hour, now.Add(2 * time.Hour), false},
		{"revoked", revokedSecret, now, false},
		{"malformed", "vgt_x", now, false},
	} {
		if _, ok := s.Identify(tt.secret, tt.at); ok != tt.want {
			t.Errorf("%s: Identify = %v, want %v", tt.name, ok, tt.want)
		}
	}
	if got := s.Tiers(); len(got) != 2 || got["free"] != 1 || got["pro"] != 1 {
		t.Errorf("Tiers() = %v, want free:1 pro:1", got)
	}
}

func TestServiceBatchesLastUsed(t *testing.T) {
	var counting *countingStore
	s, cli := startService(t, func(s *Service) {
		s.flushEvery = time.Hour // flushed by hand below
		open := s.open
		s.open = func() (store.Backend, error) {
			st, err := open()
			counting = &countingStore{Backend: st}
			return counting, err
		}
	})
	now := time.Now().Truncate(time.Millisecond)
	var secrets []string
	var ids []string
	for range 3 {
		r, secret := create(t, cli, "k", "free", time.Time{}, now)
		secrets = append(secrets, secret)
		ids = append(ids, r.ID)
	}
	testcheck.Within(t, "the keys are loaded", func() bool {
		_, ok := s.Identify(secrets[2], now)
		return ok
	})

	// Many uses within a minute make one write of three keys.
	for i := range 10_000 {
		at := now.Add(time.Duration(i) * time.Millisecond) // 10s
		if _, ok := s.Identify(secrets[i%3], at); !ok {
			t.Fatal("a key is not identified")
		}
	}
	if err := s.flush(t.Context(), s.Store()); err != nil {
		t.Fatal(err)
	}
	if err := s.flush(t.Context(), s.Store()); err != nil { // nothing left: no write
		t.Fatal(err)
	}
	writes := counting.writes()
	if len(writes) != 1 || len(writes[0]) != 3 {
		t.Fatalf("%d writes (%v), want one of 3 keys", len(writes), writes)
	}
	for _, id := range ids {
		r, err := cli.Get(t.Context(), id)
		if err != nil || r.LastUsed.Before(now) || r.LastUsed.After(now.Add(10*time.Second)) {
			t.Errorf("LastUsed of %s = %v (%v), want within the 10s of use", id, r.LastUsed, err)
		}
	}

	// A minute later, uses are recorded again; Stop writes them.
	for _, secret := range secrets[:2] {
		s.Identify(secret, now.Add(75*time.Second))
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	writes = counting.writes()
	if len(writes) != 2 || len(writes[1]) != 2 || !writes[1][ids[0]].Equal(now.Add(75*time.Second)) {
		t.Errorf("writes %v, want a second one, of two keys, at their use", writes)
	}
}

func TestServiceLifecycle(t *testing.T) {
	before := runtime.NumGoroutine()
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "keys.db")
	s, err := NewService("sqlite:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "sub")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("NewService touched the file system: %v", err)
	}
	if s.Store() != nil {
		t.Error("a store before Start")
	}
	if _, ok := s.Identify("vgt_", time.Now()); ok {
		t.Error("identified before Start")
	}

	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() { errs <- s.Start() })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Start: %v", err)
		}
	}
	_, secret := create(t, s.Store(), "k", "free", time.Time{}, time.Now())
	s.changed(t.Context())
	testcheck.Within(t, "a key added through Store", func() bool { _, ok := s.Identify(secret, time.Now()); return ok })

	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := s.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, ok := s.Identify(secret, time.Now()); ok {
		t.Error("a stopped service identifies")
	}
	if err := s.Start(); err == nil {
		t.Error("Start after Stop succeeded")
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines after Stop, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServiceStartFailsAndRetries(t *testing.T) {
	dir := t.TempDir()
	blocker := filepath.Join(dir, "blocker")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := NewService("sqlite:"+filepath.Join(blocker, "keys.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err == nil {
		t.Fatal("started on a path under a file")
	}
	if err := os.Remove(blocker); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatalf("Start after the cause went away: %v", err)
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
}

// flakyLoader fails its first load after passing on some keys.
type flakyLoader struct {
	*sqlite.Store
	failed bool
}

func (f *flakyLoader) LoadAll(ctx context.Context, batch int, fn func([]store.Record)) (uint64, error) {
	if !f.failed {
		f.failed = true
		f.Store.LoadAll(ctx, batch, fn)
		return 0, errors.New("disk on fire")
	}
	return f.Store.LoadAll(ctx, batch, fn)
}

func TestServiceRetriesAFailedLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.db")
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rec, secret := create(t, st, "k", "free", time.Time{}, time.Now())
	create(t, st, "other", "free", time.Time{}, time.Now())

	s, err := NewService("sqlite:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	loader := &flakyLoader{}
	s.open = func() (store.Backend, error) {
		sq, err := sqlite.Open(path)
		loader.Store = sq
		return loader, err
	}
	if err := s.Start(); err == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("Start = %v, want the load's failure", err)
	}
	if _, ok := s.Identify(secret, time.Now()); ok {
		t.Error("a key of a failed load is identified")
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if n := s.index.size(); n != 2 {
		t.Errorf("%d keys in the index after a retry, want 2", n)
	}
	newSecret, err := Rotate(t.Context(), st, rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "rotation takes effect after a retried load", func() bool {
		_, oldOK := s.Identify(secret, time.Now())
		_, newOK := s.Identify(newSecret, time.Now())
		return !oldOK && newOK
	})
}

func TestIdentifyAllocatesNothing(t *testing.T) {
	s, cli := startService(t, nil)
	_, secret := create(t, cli, "k", "free", time.Time{}, time.Now())
	testcheck.Within(t, "the key is loaded", func() bool { _, ok := s.Identify(secret, time.Now()); return ok })
	unknown, _ := clientkey.New()
	now := time.Now()
	for name, key := range map[string]string{"known": secret, "unknown": unknown, "malformed": secret[:20]} {
		if n := testing.AllocsPerRun(1000, func() { s.Identify(key, now) }); n != 0 {
			t.Errorf("Identify(%s): %v allocations, want 0", name, n)
		}
	}
	// Keys with settings fill a side map, which every Identify then reads.
	_, withSettings := createWith(t, cli, Attrs{Name: "s", Tier: "pro", Settings: fullSettings()}, time.Now())
	testcheck.Within(t, "the key with settings is loaded", func() bool { c, ok := s.Identify(withSettings, time.Now()); return ok && c.Settings != nil })
	for name, key := range map[string]string{"known, settings about": secret, "with settings": withSettings, "unknown, settings about": unknown} {
		if n := testing.AllocsPerRun(1000, func() { s.Identify(key, now) }); n != 0 {
			t.Errorf("Identify(%s): %v allocations, want 0", name, n)
		}
	}
	unstarted, err := NewService("sqlite:"+filepath.Join(t.TempDir(), "k.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() { unstarted.Identify(secret, now) }); n != 0 {
		t.Errorf("Identify before Start: %v allocations, want 0", n)
	}
}

func TestParseSpec(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		spec, kind, target string
		wantErr            string
	}{
		{spec: "sqlite:/var/lib/caddy/v.db", kind: "sqlite", target: "/var/lib/caddy/v.db"},
		{spec: "sqlite:rel/v.db", kind: "sqlite", target: filepath.Join(wd, "rel", "v.db")},
		{spec: "sqlite:/a/../b/v.db", kind: "sqlite", target: "/b/v.db"},
		{spec: "redis://127.0.0.1:6379/0", kind: "redis", target: "redis://127.0.0.1:6379/0"},
		{spec: "rediss://:pw@cache:6380/1", kind: "redis", target: "rediss://:pw@cache:6380/1"},
		{spec: "sqlite:", wantErr: "needs a path"},
		{spec: "", wantErr: "unknown key store"},
		{spec: "/var/lib/v.db", wantErr: "unknown key store"},
		{spec: "postgres://db", wantErr: "unknown key store"},
		{spec: "redis://", wantErr: "invalid redis"},
		{spec: "mysql://u:secretpw@db/x", wantErr: "unknown key store"},
	}
	for _, tt := range tests {
		t.Run(tt.spec, func(t *testing.T) {
			kind, target, err := store.ParseSpec(tt.spec)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseSpec(%q) error = %v, want one saying %q", tt.spec, err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "secretpw") {
					t.Errorf("the error repeats a password: %v", err)
				}
				return
			}
			if err != nil || kind != tt.kind || target != tt.target {
				t.Errorf("ParseSpec(%q) = %q, %q, %v; want %q, %q", tt.spec, kind, target, err, tt.kind, tt.target)
			}
		})
	}
}

func TestDefaultSQLitePath(t *testing.T) {
	t.Setenv("XDG_DATA_HOME", "/data")
	if got, want := store.DefaultSQLitePath(), "/data/caddy/vigthoria/vigthoria.db"; got != want {
		t.Errorf("DefaultSQLitePath() = %q, want %q", got, want)
	}
}

// stallingStore, once armed, holds the Service's loop inside Changes
// until the Service's context ends and the test lets it go.
type stallingStore struct {
	store.Backend
	armed    atomic.Bool
	once     sync.Once
	entered  chan struct{} // closed when the loop stalls in Changes
	canceled chan struct{} // closed when its context ended meanwhile
	release  chan struct{}
}

func (st *stallingStore) Changes(ctx context.Context, cursor uint64) ([]store.Record, uint64, error) {
	stall := false
	if st.armed.Load() {
		st.once.Do(func() { stall = true })
	}
	if !stall {
		return st.Backend.Changes(ctx, cursor)
	}
	close(st.entered)
	<-ctx.Done()
	close(st.canceled)
	<-st.release
	return nil, 0, ctx.Err()
}

// TestStopLetsTheLoopTakeTheLock: Stop lets go of the Service's lock
// before it waits for the loop, which may need it (the signing keys are
// read through Store). Holding it, a config reload that stops the
// Service while the loop is busy hung forever.
func TestStopLetsTheLoopTakeTheLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys.db")
	s, err := NewService("sqlite:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.poll = 20 * time.Millisecond
	st := &stallingStore{entered: make(chan struct{}), canceled: make(chan struct{}), release: make(chan struct{})}
	s.open = func() (store.Backend, error) {
		inner, err := sqlite.Open(path)
		st.Backend = inner
		return st, err
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	st.armed.Store(true)
	<-st.entered
	stopped := make(chan error, 1)
	go func() { stopped <- s.Stop() }()
	<-st.canceled // Stop is waiting for the loop now
	took := make(chan store.Backend, 1)
	go func() { took <- s.Store() }()
	select {
	case <-took:
	case <-time.After(10 * time.Second): // a hang, not a timing goal
		t.Error("Store waited for Stop, which waits for the loop: the loop could never take the lock")
	}
	close(st.release)
	if err := <-stopped; err != nil {
		t.Errorf("Stop: %v", err)
	}
}

// TestUseTiers checks that the tiers of configs overlapping in a reload
// are known while either is, and no longer once both are released.
func TestUseTiers(t *testing.T) {
	s, err := NewService("sqlite:"+filepath.Join(t.TempDir(), "k.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	oldCfg := s.UseTiers([]string{"free", "pro"})
	newCfg := s.UseTiers([]string{"pro", "team"})
	if got := s.ConfiguredTiers(); !slices.Equal(got, []string{"free", "pro", "team"}) {
		t.Errorf("during the reload: %q, want both configs' tiers", got)
	}
	oldCfg()
	oldCfg() // a second release changes nothing
	if got := s.ConfiguredTiers(); !slices.Equal(got, []string{"pro", "team"}) {
		t.Errorf("after the old config's cleanup: %q, want the new config's", got)
	}
	newCfg()
	if got := s.ConfiguredTiers(); len(got) != 0 {
		t.Errorf("with no config: %q, want none", got)
	}
}
