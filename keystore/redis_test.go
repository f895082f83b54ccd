package keystore

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// openRedisTemp starts a redis-server for the test and opens a store on
// it, closed at the end of the test.
func openRedisTemp(t *testing.T) (*Redis, *redistest.Server) {
	t.Helper()
	srv := redistest.Start(t)
	st, err := OpenRedis(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, srv
}

// rawRedis returns a plain client of srv, for looking behind the store.
func rawRedis(t *testing.T, url string) *redis.Client {
	t.Helper()
	opts, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opts)
	t.Cleanup(func() { c.Close() })
	return c
}

// waitFor polls cond until it holds or d has passed.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// identified reports whether s identifies secret now.
func identified(s *Service, secret string) bool {
	_, ok := s.Identify(secret, time.Now())
	return ok
}

// backends open a new, empty store of each kind, closed at the end of
// the test: the behaviour the Store interface promises is tested on all.
var backends = []struct {
	name string
	open func(t *testing.T) Store
}{
	{"sqlite", func(t *testing.T) Store { st, _ := openTemp(t); return st }},
	{"redis", func(t *testing.T) Store { st, _ := openRedisTemp(t); return st }},
}

func forEachBackend(t *testing.T, test func(t *testing.T, st Store)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { test(t, b.open(t)) })
	}
}

func TestStoreLifecycle(t *testing.T) {
	forEachBackend(t, func(t *testing.T, st Store) {
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
		if _, err := st.Get(ctx, "key_unknown"); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(unknown) = %v, want ErrNotFound", err)
		}
		list, err := st.List(ctx)
		if err != nil || len(list) != 3 {
			t.Fatalf("List = %d records, %v; want 3", len(list), err)
		}
		for i, want := range []Record{early, alice, bob} {
			wantRecord(t, list[i], want)
		}

		secret, err := Rotate(ctx, st, alice.ID)
		if err != nil {
			t.Fatal(err)
		}
		rotated, _ := st.Get(ctx, alice.ID)
		if rotated.Hash != HashSecret(secret) || rotated.Hash == alice.Hash {
			t.Error("Rotate did not store the new secret's hash")
		}
		if rotated.Name != alice.Name || !rotated.Created.Equal(alice.Created) {
			t.Errorf("Rotate changed more than the hash: %+v", rotated)
		}
		if _, err := Rotate(ctx, st, "key_unknown"); !errors.Is(err, ErrNotFound) {
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
		if !revoked.Revoked.Equal(revokedAt) || revoked.State(now) != StateRevoked {
			t.Errorf("revoked at %v, state %s; want the first revocation's time, revoked", revoked.Revoked, revoked.State(now))
		}
		if _, err := Rotate(ctx, st, alice.ID); !errors.Is(err, ErrRevoked) {
			t.Errorf("Rotate(revoked) = %v, want ErrRevoked", err)
		}
		if err := st.Revoke(ctx, "key_unknown", now); !errors.Is(err, ErrNotFound) {
			t.Errorf("Revoke(unknown) = %v, want ErrNotFound", err)
		}
		if err := st.Revoke(ctx, bob.ID, time.Time{}); !errors.Is(err, ErrInvalid) {
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
	forEachBackend(t, func(t *testing.T, st Store) {
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
		byID := map[string]Record{list[0].ID: list[0], list[1].ID: list[1]}
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
		minter.Hash = HashSecret(secret)
		recs, _, err := st.Changes(ctx, cursor)
		if err != nil || len(recs) != 1 {
			t.Fatalf("Changes after the rotation = %d records, %v; want 1", len(recs), err)
		}
		wantRecord(t, recs[0], minter)
		revokedAt := storedTime(now.Add(time.Minute))
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

func TestRedisKeyWithoutMint(t *testing.T) {
	st, srv := openRedisTemp(t)
	r, _ := createWith(t, st, Attrs{Name: "old", Tier: "pro", Mint: []string{"free"}}, time.Now())
	// A key written by an older version has no mint field.
	if err := rawRedis(t, srv.URL).HDel(t.Context(), redisKeyPrefix+r.ID, "mint").Err(); err != nil {
		t.Fatal(err)
	}
	got, err := st.Get(t.Context(), r.ID)
	if err != nil {
		t.Fatal(err)
	}
	r.Mint = nil
	wantRecord(t, got, r)
}

func TestStoreChanges(t *testing.T) {
	forEachBackend(t, func(t *testing.T, st Store) {
		ctx := t.Context()
		changes := func(cursor uint64) ([]Record, []string, uint64) {
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
		if _, err := Rotate(ctx, st, a.ID); !errors.Is(err, ErrRevoked) {
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
		bl := st.(bulkLoader)
		var loaded []string
		cursor, err := bl.loadAll(ctx, 1, func(recs []Record) {
			if len(recs) > 1 {
				t.Errorf("a batch of %d records, want at most 1", len(recs))
			}
			for _, r := range recs {
				loaded = append(loaded, r.ID)
			}
		})
		if err != nil || cursor != c3 {
			t.Fatalf("loadAll: cursor %d, %v; want %d", cursor, err, c3)
		}
		if len(loaded) != 2 {
			t.Errorf("loadAll passed %v, want both keys", loaded)
		}
		if n, err := bl.countKeys(ctx); err != nil || n != 2 {
			t.Errorf("countKeys = %d, %v; want 2", n, err)
		}
	})
}

func TestStoreTouchLastUsed(t *testing.T) {
	forEachBackend(t, func(t *testing.T, st Store) {
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
		if _, err := st.Get(ctx, "key_unknown"); !errors.Is(err, ErrNotFound) {
			t.Errorf("touching an unknown key made it: %v", err)
		}
	})
}

func TestRedisManyKeysInPages(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	st.page = 3
	other, err := OpenRedis(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	// Two handles write at once; every write gets its own seq.
	var wg sync.WaitGroup
	errs := make(chan error, 2*800)
	for _, h := range []*Redis{st, other} {
		wg.Go(func() {
			for range 800 {
				_, _, err := Create(ctx, h, Attrs{Name: "concurrent", Tier: "free"}, time.Now())
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent write: %v", err)
		}
	}
	recs, cursor, err := st.Changes(ctx, 0)
	if err != nil || len(recs) != 1600 || cursor&seqMask != 1600 {
		t.Fatalf("Changes(0) = %d records, cursor seq %d, %v; want 1600 in pages of 3", len(recs), cursor&seqMask, err)
	}
	// More keys than one script of TouchLastUsed holds.
	used := make(map[string]time.Time)
	at := time.Now().Truncate(time.Millisecond)
	seen := make(map[string]bool)
	for _, r := range recs {
		if seen[r.ID] {
			t.Fatalf("key %s twice", r.ID)
		}
		seen[r.ID] = true
		used[r.ID] = at
	}
	if err := st.TouchLastUsed(ctx, used); err != nil {
		t.Fatal(err)
	}
	list, err := other.List(ctx)
	if err != nil || len(list) != 1600 {
		t.Fatalf("List = %d records, %v", len(list), err)
	}
	for i, r := range list {
		if !r.LastUsed.Equal(at) {
			t.Fatalf("LastUsed of %s = %v, want %v", r.ID, r.LastUsed, at)
		}
		if i > 0 && r.Created.Before(list[i-1].Created) {
			t.Fatalf("List is not in order of creation at %d", i)
		}
	}
	var batches int
	loaded, err := st.loadAll(ctx, 500, func(recs []Record) {
		batches++
		if len(recs) > 3 {
			t.Fatalf("a batch of %d, want the page of 3", len(recs))
		}
	})
	if err != nil || loaded != cursor || batches != 534 {
		t.Errorf("loadAll: cursor %d, %d batches, %v; want %d, 534", loaded, batches, err, cursor)
	}
}

func TestRedisStoreReset(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	raw := rawRedis(t, srv.URL)
	create(t, st, "a", "free", time.Time{}, time.Now())
	create(t, st, "b", "free", time.Time{}, time.Now())
	_, cursor, err := st.Changes(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}

	// Another epoch: a store emptied and written again.
	epoch, _ := raw.Get(ctx, redisEpochKey).Uint64()
	if epoch == 0 || epoch != cursor>>epochShift {
		t.Fatalf("epoch %d, cursor %x: the cursor does not carry the epoch", epoch, cursor)
	}
	raw.Set(ctx, redisEpochKey, epoch%65535+1, 0)
	if _, _, err := st.Changes(ctx, cursor); !errors.Is(err, errStoreReset) {
		t.Errorf("Changes after the epoch changed = %v, want errStoreReset", err)
	}
	raw.Set(ctx, redisEpochKey, epoch, 0)

	// An older copy: the counter is behind the cursor.
	raw.Set(ctx, redisCounterKey, 1, 0)
	if _, _, err := st.Changes(ctx, cursor); !errors.Is(err, errStoreReset) {
		t.Errorf("Changes after the counter went back = %v, want errStoreReset", err)
	}
	raw.Set(ctx, redisCounterKey, 2, 0)
	if _, c, err := st.Changes(ctx, cursor); err != nil || c != cursor {
		t.Fatalf("Changes restored = %d, %v; want %d", c, err, cursor)
	}

	// Emptied: the server restarted without its data. The same handle
	// works on, and a fresh start from 0 sees the new keys.
	srv.Restart(t)
	if _, _, err := st.Changes(ctx, cursor); !errors.Is(err, errStoreReset) {
		t.Errorf("Changes after a restart = %v, want errStoreReset", err)
	}
	c, _ := create(t, st, "c", "free", time.Time{}, time.Now())
	if _, _, err := st.Changes(ctx, cursor); !errors.Is(err, errStoreReset) {
		t.Errorf("Changes after a restart and a write = %v, want errStoreReset", err)
	}
	recs, _, err := st.Changes(ctx, 0)
	if err != nil || len(recs) != 1 || recs[0].ID != c.ID {
		t.Errorf("Changes(0) after a restart = %v, %v; want the one new key", recs, err)
	}
}

func TestRedisHoldsNoSecret(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	now := time.Now()
	var secrets []string
	used := make(map[string]time.Time)
	for i := range 20 {
		r, s := create(t, st, "k", "free", now.Add(time.Hour), now)
		secrets = append(secrets, s)
		used[r.ID] = now
		switch i % 3 {
		case 0:
			s, err := Rotate(ctx, st, r.ID)
			if err != nil {
				t.Fatal(err)
			}
			secrets = append(secrets, s)
		case 1:
			if err := st.Revoke(ctx, r.ID, now); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := st.TouchLastUsed(ctx, used); err != nil {
		t.Fatal(err)
	}
	if err := st.AddUsage(ctx, UsageBatch{Writer: "w", Seq: 1, Rows: []UsageRow{{Client: "key_x", Day: Day(now), Model: "m", Requests: 1}}}); err != nil {
		t.Fatal(err)
	}

	// Every key and value in Redis, whatever its type.
	raw := rawRedis(t, srv.URL)
	var dump strings.Builder
	types := make(map[string]int)
	iter := raw.Scan(ctx, 0, "*", 100).Iterator()
	for iter.Next(ctx) {
		k := iter.Val()
		dump.WriteString(k + "\n")
		typ, err := raw.Type(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		types[typ]++
		var vals []string
		switch typ {
		case "string":
			var v string
			v, err = raw.Get(ctx, k).Result()
			vals = []string{v}
		case "hash":
			m, err := raw.HGetAll(ctx, k).Result()
			if err != nil {
				t.Fatal(err)
			}
			for f, v := range m {
				vals = append(vals, f, v)
			}
		case "zset":
			vals, err = raw.ZRange(ctx, k, 0, -1).Result()
		case "set":
			vals, err = raw.SMembers(ctx, k).Result()
		case "list":
			vals, err = raw.LRange(ctx, k, 0, -1).Result()
		default:
			t.Errorf("key %s of type %s, which the dump does not read", k, typ)
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range vals {
			dump.WriteString(v + "\n")
		}
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	if types["hash"] != 21 || types["zset"] != 1 || types["string"] != 3 {
		t.Errorf("key types %v, want 21 hashes (20 keys, 1 day of usage), 1 zset, 3 strings (counter, epoch, the ledger's sequence)", types)
	}
	all := dump.String()
	for _, s := range secrets {
		for _, part := range []string{s, s[4:36], s[len(s)-8:], s[4:12]} {
			if strings.Contains(all, part) {
				t.Errorf("Redis holds %q of a secret", part)
			}
		}
	}
	// The search looks in the right place: the hashes are there.
	last := HashSecret(secrets[len(secrets)-1])
	if !strings.Contains(all, string(last[:])) {
		t.Error("Redis does not hold the hash of the last key")
	}
}

func TestRedisLedger(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	now := time.Date(2030, 3, 2, 12, 0, 0, 0, time.UTC)
	day1, day2 := "2030-03-01", "2030-03-02"
	batch := []UsageRow{
		{Client: "key_a", Day: day1, Model: "vigthoria-pro", Requests: 2, PromptTokens: 100, CompletionTokens: 50, Cost: 1_750},
		{Client: "key_a", Day: day1, Model: "vigthoria-fast", Requests: 1, PromptTokens: 10, CompletionTokens: 5},
		{Client: "key_a", Day: day2, Model: "vigthoria-fast", Requests: 3, PromptTokens: 30, CompletionTokens: 15},
		{Client: "key_a", Day: "2030-02-28", Model: "vigthoria-fast", Requests: 9, PromptTokens: 9, CompletionTokens: 9},
		{Client: "key_a:x", Day: day1, Model: "vigthoria-pro", Requests: 7, PromptTokens: 7, CompletionTokens: 7},
		{Client: "key_b", Day: day2, Model: "vigthoria-pro", Requests: 5, PromptTokens: 5, CompletionTokens: 5},
	}
	// Two batches: the second adds to the first. The first again, as a
	// ledger retries a write whose answer it lost, and an older one, add
	// nothing.
	for _, seq := range []uint64{1, 2, 2, 1} {
		if err := st.AddUsage(ctx, UsageBatch{Writer: "w1", Seq: seq, Rows: batch}); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.AddUsage(ctx, UsageBatch{Writer: "w1", Seq: 3}); err != nil {
		t.Fatal(err)
	}
	got, err := st.usageSince(ctx, "key_a", day1, now)
	if err != nil {
		t.Fatal(err)
	}
	want := []UsageRow{
		{Client: "key_a", Day: day1, Model: "vigthoria-fast", Requests: 2, PromptTokens: 20, CompletionTokens: 10},
		{Client: "key_a", Day: day1, Model: "vigthoria-pro", Requests: 4, PromptTokens: 200, CompletionTokens: 100, Cost: 3_500},
		{Client: "key_a", Day: day2, Model: "vigthoria-fast", Requests: 6, PromptTokens: 60, CompletionTokens: 30},
	}
	if len(got) != len(want) {
		t.Fatalf("UsageSince = %+v\nwant %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("row %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	if got, err := st.usageSince(ctx, "key_a", day2, now); err != nil || len(got) != 1 || got[0] != want[2] {
		t.Errorf("UsageSince(day 2) = %+v, %v; want %+v", got, err, want[2])
	}
	if got, err := st.usageSince(ctx, "key_nobody", day1, now); err != nil || len(got) != 0 {
		t.Errorf("UsageSince of a client without usage = %+v, %v", got, err)
	}
	if _, err := st.UsageSince(ctx, "key_a", "March 1st"); !errors.Is(err, ErrInvalid) {
		t.Errorf("UsageSince of a bad day = %v, want ErrInvalid", err)
	}

	// Each day expires on its own.
	raw := rawRedis(t, srv.URL)
	keys, err := raw.Keys(ctx, redisUsagePrefix+"*").Result()
	if err != nil || len(keys) != 5 {
		t.Fatalf("usage keys %v (%v), want 5", keys, err)
	}
	if ttl := raw.TTL(ctx, redisWriterPrefix+"w1").Val(); ttl < writerTTL-time.Minute || ttl > writerTTL {
		t.Errorf("TTL of the writer's sequence = %v, want %v", ttl, writerTTL)
	}
	for _, k := range keys {
		if ttl := raw.TTL(ctx, k).Val(); ttl < usageTTL-time.Minute || ttl > usageTTL {
			t.Errorf("TTL of %s = %v, want %v", k, ttl, usageTTL)
		}
	}
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
	within(t, "a key added on one instance works on the other", func() bool {
		c, ok := s2.Identify(secret, time.Now())
		return ok && c == Client{ID: rec.ID, Name: "alice", Tier: "pro"}
	})
	newSecret, err := Rotate(ctx, s2.Store(), rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	within(t, "a rotation on one instance takes effect on the other", func() bool {
		return !identified(s1, secret) && identified(s1, newSecret)
	})
	if err := s1.Store().Revoke(ctx, rec.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	within(t, "a revocation on one instance takes effect on both", func() bool {
		return !identified(s2, newSecret) && !identified(s1, newSecret)
	})

	// One ledger: what one instance counted, the other reads.
	now := time.Now()
	s1.Ledger().Add("key_a", "vigthoria-pro", now, Tokens{Prompt: 100, Completion: 20})
	s1.Ledger().Add("key_a", "vigthoria-pro", now, Tokens{Prompt: 1, Completion: 2})
	if err := s1.Ledger().flush(ctx); err != nil {
		t.Fatal(err)
	}
	s2.Ledger().Add("key_a", "vigthoria-fast", now, Tokens{Prompt: 1000}) // pending, not flushed
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
	s.changed()
	within(t, "the key is identified", func() bool { return identified(s, gone) })

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
	other, err := OpenRedis(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	_, secret := create(t, other, "b", "free", time.Time{}, time.Now())
	within(t, "a key added after the restart", func() bool { return identified(s, secret) })
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
	Store
	fail atomic.Bool
}

func (f *failingStore) Changes(ctx context.Context, cursor uint64) ([]Record, uint64, error) {
	if f.fail.Load() {
		return nil, cursor, errors.New("disk on fire")
	}
	return f.Store.Changes(ctx, cursor)
}

func TestServiceStalenessBoundOnSQLite(t *testing.T) {
	var failing *failingStore
	s, cli := startService(t, func(s *Service) {
		if s.maxStale != maxStaleness {
			t.Errorf("default staleness bound %v, want %v", s.maxStale, maxStaleness)
		}
		s.maxStale = 300 * time.Millisecond
		open := s.open
		s.open = func() (Store, error) {
			st, err := open()
			failing = &failingStore{Store: st}
			return failing, err
		}
	})
	_, secret := create(t, cli, "k", "free", time.Time{}, time.Now())
	within(t, "the key is identified", func() bool { return identified(s, secret) })
	failing.fail.Store(true)
	time.Sleep(100 * time.Millisecond)
	if !identified(s, secret) {
		t.Error("refused within the bound")
	}
	within(t, "refused past the bound", func() bool { return !identified(s, secret) })
	failing.fail.Store(false)
	within(t, "accepted once syncs work", func() bool { return identified(s, secret) })
}

func TestRedisCLIRoundTrip(t *testing.T) {
	srv := redistest.Start(t)
	const password = "s3cret-pw"
	if err := rawRedis(t, srv.URL).ConfigSet(t.Context(), "requirepass", password).Err(); err != nil {
		t.Fatal(err)
	}
	url := "redis://:" + password + "@" + srv.Addr + "/0"
	s, err := NewService(url, nil)
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
	within(t, "the CLI's key is identified", func() bool {
		c, ok := s.Identify(secret, time.Now())
		return ok && c == Client{ID: id, Name: "alice", Tier: "pro"}
	})
	if list := mustCLI(t, "key", "list", store); !strings.Contains(list, id) || !strings.Contains(list, "active") {
		t.Errorf("list = %q, want the key, active", list)
	}
	newSecret := printedSecret.FindString(mustCLI(t, "key", "rotate", id, store))
	within(t, "the rotation is seen", func() bool { return !identified(s, secret) && identified(s, newSecret) })
	mustCLI(t, "key", "revoke", id, store)
	within(t, "the revocation is seen", func() bool { return !identified(s, newSecret) })
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

func TestOpenRedisErrors(t *testing.T) {
	for _, url := range []string{
		"redis://:s3cret-pw@127.0.0.1:1/0",
		"redis://:s3cret-pw@127.0.0.1:1/notadb",
		"redis://:s3cret-pw@127.0.0.1:port/0",
		"http://:s3cret-pw@127.0.0.1:6379/0",
	} {
		st, err := OpenRedis(url)
		if err == nil {
			st.Close()
			t.Errorf("OpenRedis(%q) succeeded", url)
			continue
		}
		if strings.Contains(err.Error(), "s3cret-pw") {
			t.Errorf("OpenRedis(%q) = %v: the error repeats the password", url, err)
		}
	}

	// NewService touches nothing; Start fails without a server, and the
	// error holds no password.
	s, err := NewService("redis://:s3cret-pw@127.0.0.1:1/0", nil)
	if err != nil {
		t.Fatalf("NewService(redis) = %v", err)
	}
	if err := s.Start(); err == nil || strings.Contains(err.Error(), "s3cret-pw") {
		t.Errorf("Start without a server = %v, want an error without the password", err)
	}
	if err := s.Stop(); err != nil {
		t.Error(err)
	}
}
