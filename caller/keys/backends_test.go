package keys

import (
	"context"
	"errors"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/store"
	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// openRedisTemp starts a redis-server for the test and opens a store on
// it, closed at the end of the test.
func openRedisTemp(t *testing.T) (*redisstore.Store, *redistest.Server) {
	t.Helper()
	srv := redistest.Start(t)
	st, err := redisstore.Open(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, srv
}

// openAfterRestart opens a store on a Redis that was just restarted. The
// store shares its client with the Service's store of the same URL,
// whose pool failed dials all through the outage: go-redis then fails
// dials at once until its redial, once a second, succeeds.
func openAfterRestart(url string) (*redisstore.Store, error) {
	deadline := time.Now().Add(3 * time.Second)
	for {
		st, err := redisstore.Open(url)
		if err == nil || time.Now().After(deadline) {
			return st, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitFor polls cond until it holds or d has passed.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	testcheck.WaitFor(t, d, what, cond)
}

// identified reports whether s identifies secret now.
func identified(s *Service, secret string) bool {
	_, ok := s.Identify(secret, time.Now())
	return ok
}

func forEachBackend(t *testing.T, test func(t *testing.T, st store.Backend)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { test(t, b.open(t)) })
	}
}

func TestStoreLifecycle(t *testing.T) {
	forEachBackend(t, func(t *testing.T, st store.Backend) {
		ctx := t.Context()
		now := time.Date(2030, 1, 2, 3, 4, 5, 678_901_234, time.UTC)
		alice, _ := create(t, st, "alice", "pro", time.Time{}, now)
		bob, _ := create(t, st, "Bob's laptop ✓", "free", now.Add(time.Hour), now.Add(time.Second))
		// Created later, listed first: List orders by creation.
		early, _ := create(t, st, "early", "free", time.Time{}, now.Add(-time.Hour))

		got, err := st.Get(ctx, alice.ID)
		if err != nil {
			t.Fatal(err)
		}
		wantRecord(t, got, alice)
		if _, err := st.Get(ctx, "key_unknown"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Get(unknown) = %v, want ErrNotFound", err)
		}
		list, err := st.List(ctx)
		if err != nil || len(list) != 3 {
			t.Fatalf("List = %d records, %v; want 3", len(list), err)
		}
		for i, want := range []store.Record{early, alice, bob} {
			wantRecord(t, list[i], want)
		}

		secret, err := Rotate(ctx, st, alice.ID)
		if err != nil {
			t.Fatal(err)
		}
		rotated, _ := st.Get(ctx, alice.ID)
		if rotated.Hash != store.HashSecret(secret) || rotated.Hash == alice.Hash {
			t.Error("Rotate did not store the new secret's hash")
		}
		if rotated.Name != alice.Name || !rotated.Created.Equal(alice.Created) {
			t.Errorf("Rotate changed more than the hash: %+v", rotated)
		}
		if _, err := Rotate(ctx, st, "key_unknown"); !errors.Is(err, store.ErrNotFound) {
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
		if _, err := Rotate(ctx, st, alice.ID); !errors.Is(err, store.ErrRevoked) {
			t.Errorf("Rotate(revoked) = %v, want ErrRevoked", err)
		}
		if err := st.Revoke(ctx, "key_unknown", now); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Revoke(unknown) = %v, want ErrNotFound", err)
		}
		if err := st.Revoke(ctx, bob.ID, time.Time{}); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("Revoke at the zero time = %v, want ErrInvalid", err)
		}
		if err := st.Insert(ctx, bob); err == nil {
			t.Error("inserting a key ID twice succeeded")
		}
		if got, err := st.Get(ctx, bob.ID); err != nil {
			t.Fatal(err)
		} else {
			wantRecord(t, got, bob) // unchanged by the failed insert
		}
	})
}

func TestStoreKeepsMint(t *testing.T) {
	forEachBackend(t, func(t *testing.T, st store.Backend) {
		ctx := t.Context()
		now := time.Now()
		minter, _ := createWith(t, st, Attrs{Name: "backend", Tier: "pro", Mint: []string{"free", "basic", "free"}}, now)
		plain, _ := create(t, st, "plain", "free", time.Time{}, now)
		if want := []string{"basic", "free"}; !slices.Equal(minter.Mint, want) || plain.Mint != nil {
			t.Fatalf("Mint = %q and %q, want %q and nil", minter.Mint, plain.Mint, want)
		}

		got, err := st.Get(ctx, minter.ID)
		if err != nil {
			t.Fatal(err)
		}
		wantRecord(t, got, minter)
		list, err := st.List(ctx)
		if err != nil || len(list) != 2 {
			t.Fatalf("List = %d records, %v; want 2", len(list), err)
		}
		byID := map[string]store.Record{list[0].ID: list[0], list[1].ID: list[1]}
		wantRecord(t, byID[minter.ID], minter)
		wantRecord(t, byID[plain.ID], plain)
		_, cursor, err := st.Changes(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}

		// Rotation and revocation change the hash and the revocation
		// time, never what the key may mint.
		secret, err := Rotate(ctx, st, minter.ID)
		if err != nil {
			t.Fatal(err)
		}
		minter.Hash = store.HashSecret(secret)
		recs, _, err := st.Changes(ctx, cursor)
		if err != nil || len(recs) != 1 {
			t.Fatalf("Changes after the rotation = %d records, %v; want 1", len(recs), err)
		}
		wantRecord(t, recs[0], minter)
		revokedAt := store.StoredTime(now.Add(time.Minute))
		if err := st.Revoke(ctx, minter.ID, revokedAt); err != nil {
			t.Fatal(err)
		}
		minter.Revoked = revokedAt
		got, err = st.Get(ctx, minter.ID)
		if err != nil {
			t.Fatal(err)
		}
		wantRecord(t, got, minter)
	})
}

func TestStoreChanges(t *testing.T) {
	forEachBackend(t, func(t *testing.T, st store.Backend) {
		ctx := t.Context()
		changes := func(cursor uint64) ([]store.Record, []string, uint64) {
			t.Helper()
			recs, next, err := st.Changes(ctx, cursor)
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, r := range recs {
				ids = append(ids, r.ID)
			}
			return recs, ids, next
		}
		want := func(got []string, want ...string) {
			t.Helper()
			if strings.Join(got, ",") != strings.Join(want, ",") {
				t.Fatalf("changes %v, want %v", got, want)
			}
		}

		_, ids, c0 := changes(0)
		want(ids)
		if c0 != 0 {
			t.Errorf("cursor of an empty store = %d, want 0", c0)
		}
		now := time.Now()
		a, _ := create(t, st, "a", "free", time.Time{}, now)
		b, _ := create(t, st, "b", "free", time.Time{}, now)
		_, ids, c1 := changes(0)
		want(ids, a.ID, b.ID)
		_, ids, c2 := changes(c1)
		want(ids)
		if c2 != c1 {
			t.Errorf("cursor moved from %d to %d without changes", c1, c2)
		}

		// Rotation and revocation are changes, in their order, with the
		// new state.
		if _, err := Rotate(ctx, st, b.ID); err != nil {
			t.Fatal(err)
		}
		if err := st.Revoke(ctx, a.ID, now); err != nil {
			t.Fatal(err)
		}
		recs, ids, c3 := changes(c1)
		want(ids, b.ID, a.ID)
		if c3 <= c1 {
			t.Errorf("cursor %d after changes, want above %d", c3, c1)
		}
		if recs[0].Hash == b.Hash || recs[1].Revoked.IsZero() {
			t.Error("changes do not carry the new state")
		}

		// Revoking again, failed rotations and last use are not changes.
		if err := st.Revoke(ctx, a.ID, now); err != nil {
			t.Fatal(err)
		}
		if _, err := Rotate(ctx, st, a.ID); !errors.Is(err, store.ErrRevoked) {
			t.Fatal(err)
		}
		if err := st.TouchLastUsed(ctx, map[string]time.Time{b.ID: now}); err != nil {
			t.Fatal(err)
		}
		_, ids, c4 := changes(c3)
		want(ids)
		if c4 != c3 {
			t.Errorf("cursor moved from %d to %d", c3, c4)
		}

		// A first load gets every key, revoked ones too, and the same
		// cursor.
		var loaded []string
		cursor, err := st.LoadAll(ctx, 1, func(recs []store.Record) {
			if len(recs) > 1 {
				t.Errorf("a batch of %d records, want at most 1", len(recs))
			}
			for _, r := range recs {
				loaded = append(loaded, r.ID)
			}
		})
		if err != nil || cursor != c3 {
			t.Fatalf("LoadAll: cursor %d, %v; want %d", cursor, err, c3)
		}
		if len(loaded) != 2 {
			t.Errorf("LoadAll passed %v, want both keys", loaded)
		}
		if n, err := st.CountKeys(ctx); err != nil || n != 2 {
			t.Errorf("CountKeys = %d, %v; want 2", n, err)
		}
	})
}

func TestStoreTouchLastUsed(t *testing.T) {
	forEachBackend(t, func(t *testing.T, st store.Backend) {
		ctx := t.Context()
		now := time.Now().Truncate(time.Millisecond)
		a, _ := create(t, st, "a", "free", time.Time{}, now)
		b, _ := create(t, st, "b", "free", time.Time{}, now)
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
		if _, err := st.Get(ctx, "key_unknown"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("touching an unknown key made it: %v", err)
		}
	})
}

func TestRedisServicesShareKeysAndUsage(t *testing.T) {
	srv := redistest.Start(t)
	start := func() *Service {
		t.Helper()
		s, err := NewService(srv.URL, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := s.Stop(); err != nil {
				t.Errorf("Stop: %v", err)
			}
		})
		return s
	}
	// Two instances, at the default poll interval: the promise is a second.
	s1, s2 := start(), start()
	ctx := t.Context()

	rec, secret := create(t, s1.Store(), "alice", "pro", time.Time{}, time.Now())
	testcheck.Within(t, "a key added on one instance works on the other", func() bool {
		c, ok := s2.Identify(secret, time.Now())
		return ok && c == caller.Client{ID: rec.ID, Name: "alice", Tier: "pro"}
	})
	newSecret, err := Rotate(ctx, s2.Store(), rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "a rotation on one instance takes effect on the other", func() bool {
		return !identified(s1, secret) && identified(s1, newSecret)
	})
	if err := s1.Store().Revoke(ctx, rec.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "a revocation on one instance takes effect on both", func() bool {
		return !identified(s2, newSecret) && !identified(s1, newSecret)
	})

	// One ledger: what one instance counted, the other reads.
	now := time.Now()
	s1.Ledger().Add("key_a", "vigthoria-pro", now, ledger.Tokens{Prompt: 100, Completion: 20})
	s1.Ledger().Add("key_a", "vigthoria-pro", now, ledger.Tokens{Prompt: 1, Completion: 2})
	if err := s1.Ledger().Flush(ctx); err != nil {
		t.Fatal(err)
	}
	s2.Ledger().Add("key_a", "vigthoria-fast", now, ledger.Tokens{Prompt: 1000}) // pending, not flushed
	if used, err := s2.Ledger().QuotaUsed(ctx, "key_a", now); err != nil || used != 1123 {
		t.Errorf("QuotaUsed on the other instance = %d, %v; want 1123", used, err)
	}
}

func TestRedisOutage(t *testing.T) {
	before := runtime.NumGoroutine()
	srv := redistest.Start(t)
	core, logs := observer.New(zapcore.InfoLevel)
	s, err := NewService(srv.URL, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	s.poll = 20 * time.Millisecond
	const bound = 750 * time.Millisecond
	s.maxStale = bound
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	_, gone := create(t, s.Store(), "a", "free", time.Time{}, time.Now())
	s.changed(t.Context())
	testcheck.Within(t, "the key is identified", func() bool { return identified(s, gone) })

	// Killed: the index answers from memory, within the bound.
	srv.Kill(t)
	killed := time.Now()
	if !identified(s, gone) {
		t.Error("a known key is refused as soon as the store is down")
	}
	waitFor(t, 3*bound, "refused once the index is too old", func() bool { return !identified(s, gone) })
	if d := time.Since(killed); d < bound-100*time.Millisecond {
		t.Errorf("refused %v after the store went down, before the bound of %v", d, bound)
	}

	// Restarted empty: the keys are gone, new ones work.
	srv.Restart(t)
	other, err := openAfterRestart(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	_, secret := create(t, other, "b", "free", time.Time{}, time.Now())
	testcheck.Within(t, "a key added after the restart", func() bool { return identified(s, secret) })
	if identified(s, gone) {
		t.Error("a key that the store lost is identified")
	}

	// Paused: no answers, connections open. Resumed: accepted again.
	srv.Pause(t)
	paused := time.Now()
	waitFor(t, 3*bound, "refused while paused", func() bool { return !identified(s, secret) })
	if d := time.Since(paused); d < bound-100*time.Millisecond {
		t.Errorf("refused %v after the store paused, before the bound of %v", d, bound)
	}
	srv.Resume(t)
	waitFor(t, 2*time.Second, "accepted again after Resume", func() bool { return identified(s, secret) })

	// Each transition is logged once. A sync may fail (the store is
	// down) or hang until the store answers again (paused): staleness
	// counts from the last success either way.
	count := func(msg string) int { return logs.FilterMessage(msg).Len() }
	failed := count("reading key changes failed; retrying")
	if failed < 1 || failed > 2 || count("reading key changes works again") != failed {
		t.Errorf("logged %d failures and %d recoveries of syncs, want 1 or 2 of each", failed, count("reading key changes works again"))
	}
	for msg, want := range map[string]int{
		"key store out of reach for too long: refusing every key until it is back": 2,
		"key store in sync again: accepting keys":                                  2,
		"key store was emptied or restored: reloading every key":                   1,
	} {
		if n := count(msg); n != want {
			t.Errorf("logged %q %d times, want %d", msg, n, want)
		}
	}
	for _, e := range logs.All() {
		if e.ContextMap()["store"] != srv.URL {
			t.Errorf("log %q names the store %v, want %s", e.Message, e.ContextMap()["store"], srv.URL)
		}
	}

	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	other.Close()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines after Stop, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// failingStore fails Changes while fail is set.
type failingStore struct {
	store.Backend
	fail atomic.Bool
}

func TestServiceStalenessBoundOnSQLite(t *testing.T) {
	var failing *failingStore
	s, cli := startService(t, func(s *Service) {
		if s.maxStale != maxStaleness {
			t.Errorf("default staleness bound %v, want %v", s.maxStale, maxStaleness)
		}
		s.maxStale = 300 * time.Millisecond
		open := s.open
		s.open = func() (store.Backend, error) {
			st, err := open()
			failing = &failingStore{Backend: st}
			return failing, err
		}
	})
	_, secret := create(t, cli, "k", "free", time.Time{}, time.Now())
	testcheck.Within(t, "the key is identified", func() bool { return identified(s, secret) })
	failing.fail.Store(true)
	time.Sleep(100 * time.Millisecond)
	if !identified(s, secret) {
		t.Error("refused within the bound")
	}
	testcheck.Within(t, "refused past the bound", func() bool { return !identified(s, secret) })
	failing.fail.Store(false)
	testcheck.Within(t, "accepted once syncs work", func() bool { return identified(s, secret) })
}

func (f *failingStore) Changes(ctx context.Context, cursor uint64) ([]store.Record, uint64, error) {
	if f.fail.Load() {
		return nil, cursor, errors.New("disk on fire")
	}
	return f.Backend.Changes(ctx, cursor)
}

// openTemp opens a new SQLite store in a fresh directory and closes it at
// the end of the test.
func openTemp(t *testing.T) (*sqlite.Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sub", "keys.db")
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, path
}

// create adds a key and returns its record and secret.
func create(t *testing.T, st store.Backend, name, tier string, expires, now time.Time) (store.Record, string) {
	t.Helper()
	return createWith(t, st, Attrs{Name: name, Tier: tier, Expires: expires}, now)
}

// createWith adds a key made with a and returns its record and secret.
func createWith(t *testing.T, st store.Backend, a Attrs, now time.Time) (store.Record, string) {
	t.Helper()
	r, secret, err := Create(t.Context(), st, a, now)
	if err != nil {
		t.Fatalf("Create(%+v): %v", a, err)
	}
	return r, secret
}

func wantRecord(t *testing.T, got, want store.Record) {
	t.Helper()
	if got.ID != want.ID || got.Name != want.Name || got.Tier != want.Tier || got.Hash != want.Hash ||
		!got.Created.Equal(want.Created) || !got.Expires.Equal(want.Expires) ||
		!got.Revoked.Equal(want.Revoked) || !got.LastUsed.Equal(want.LastUsed) ||
		!slices.Equal(got.Mint, want.Mint) || (got.Mint == nil) != (want.Mint == nil) ||
		!reflect.DeepEqual(got.Settings, want.Settings) {
		t.Errorf("record = %+v\nwant     %+v", got, want)
	}
}

// backends open a new, empty store of each kind, closed at the end of
// the test: the behaviour the Store interface promises is tested on all.
var backends = []struct {
	name string
	open func(t *testing.T) store.Backend
}{
	{"sqlite", func(t *testing.T) store.Backend { st, _ := openTemp(t); return st }},
	{"redis", func(t *testing.T) store.Backend { st, _ := openRedisTemp(t); return st }},
}
