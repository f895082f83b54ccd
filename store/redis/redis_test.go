package redis

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/storetest"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// openRedisTemp starts a redis-server for the test and opens a store on
// it, closed at the end of the test.
func openRedisTemp(t *testing.T) (*Store, *redistest.Server) {
	t.Helper()
	srv := redistest.Start(t)
	st, err := Open(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, srv
}

// waitFor polls cond until it holds or d has passed.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	testcheck.WaitFor(t, d, what, cond)
}

func TestRedisKeyWithoutMint(t *testing.T) {
	st, srv := openRedisTemp(t)
	r, _ := storetest.CreateWith(t, st, keys.Attrs{Name: "old", Tier: "pro", Mint: []string{"free"}}, time.Now())
	// A key written by an older version has no mint field.
	if err := redistest.Client(t, srv.URL).HDel(t.Context(), redisKeyPrefix+r.ID, "mint").Err(); err != nil {
		t.Fatal(err)
	}
	got, err := st.Get(t.Context(), r.ID)
	if err != nil {
		t.Fatal(err)
	}
	r.Mint = nil
	storetest.WantRecord(t, got, r)
}

func TestRedisManyKeysInPages(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	st.page = 3
	other, err := Open(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	// Two handles write at once; every write gets its own seq.
	var wg sync.WaitGroup
	errs := make(chan error, 2*800)
	for _, h := range []*Store{st, other} {
		wg.Go(func() {
			for range 800 {
				_, _, err := keys.Create(ctx, h, keys.Attrs{Name: "concurrent", Tier: "free"}, time.Now())
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
	loaded, err := st.LoadAll(ctx, 500, func(recs []store.Record) {
		batches++
		if len(recs) > 3 {
			t.Fatalf("a batch of %d, want the page of 3", len(recs))
		}
	})
	if err != nil || loaded != cursor || batches != 534 {
		t.Errorf("LoadAll: cursor %d, %d batches, %v; want %d, 534", loaded, batches, err, cursor)
	}
}

func TestRedisStoreReset(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	raw := redistest.Client(t, srv.URL)
	storetest.Create(t, st, "a", "free", time.Time{}, time.Now())
	storetest.Create(t, st, "b", "free", time.Time{}, time.Now())
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
	if _, _, err := st.Changes(ctx, cursor); !errors.Is(err, store.ErrReset) {
		t.Errorf("Changes after the epoch changed = %v, want store.ErrReset", err)
	}
	raw.Set(ctx, redisEpochKey, epoch, 0)

	// An older copy: the counter is behind the cursor.
	raw.Set(ctx, redisCounterKey, 1, 0)
	if _, _, err := st.Changes(ctx, cursor); !errors.Is(err, store.ErrReset) {
		t.Errorf("Changes after the counter went back = %v, want store.ErrReset", err)
	}
	raw.Set(ctx, redisCounterKey, 2, 0)
	if _, c, err := st.Changes(ctx, cursor); err != nil || c != cursor {
		t.Fatalf("Changes restored = %d, %v; want %d", c, err, cursor)
	}

	// Emptied: the server restarted without its data. The same handle
	// works on, and a fresh start from 0 sees the new keys.
	srv.Restart(t)
	if _, _, err := st.Changes(ctx, cursor); !errors.Is(err, store.ErrReset) {
		t.Errorf("Changes after a restart = %v, want store.ErrReset", err)
	}
	c, _ := storetest.Create(t, st, "c", "free", time.Time{}, time.Now())
	if _, _, err := st.Changes(ctx, cursor); !errors.Is(err, store.ErrReset) {
		t.Errorf("Changes after a restart and a write = %v, want store.ErrReset", err)
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
		r, s := storetest.Create(t, st, "k", "free", now.Add(time.Hour), now)
		secrets = append(secrets, s)
		used[r.ID] = now
		switch i % 3 {
		case 0:
			s, err := keys.Rotate(ctx, st, r.ID)
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
	if err := st.AddUsage(ctx, store.UsageBatch{Writer: "w", Seq: 1, Rows: []store.UsageRow{{Client: "key_x", Day: store.Day(now), Model: "m", Requests: 1}}}); err != nil {
		t.Fatal(err)
	}

	// Every key and value in Redis, whatever its type.
	raw := redistest.Client(t, srv.URL)
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
	last := store.HashSecret(secrets[len(secrets)-1])
	if !strings.Contains(all, string(last[:])) {
		t.Error("Redis does not hold the hash of the last key")
	}
}

func TestRedisLedger(t *testing.T) {
	ctx := t.Context()
	st, srv := openRedisTemp(t)
	now := time.Date(2030, 3, 2, 12, 0, 0, 0, time.UTC)
	day1, day2 := "2030-03-01", "2030-03-02"
	batch := []store.UsageRow{
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
		if err := st.AddUsage(ctx, store.UsageBatch{Writer: "w1", Seq: seq, Rows: batch}); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.AddUsage(ctx, store.UsageBatch{Writer: "w1", Seq: 3}); err != nil {
		t.Fatal(err)
	}
	got, err := st.usageSince(ctx, "key_a", day1, now)
	if err != nil {
		t.Fatal(err)
	}
	want := []store.UsageRow{
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
	if _, err := st.UsageSince(ctx, "key_a", "March 1st"); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("UsageSince of a bad day = %v, want ErrInvalid", err)
	}

	// Each day expires on its own.
	raw := redistest.Client(t, srv.URL)
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

func TestOpenRedisErrors(t *testing.T) {
	for _, url := range []string{
		"redis://:s3cret-pw@127.0.0.1:1/0",
		"redis://:s3cret-pw@127.0.0.1:1/notadb",
		"redis://:s3cret-pw@127.0.0.1:port/0",
		"http://:s3cret-pw@127.0.0.1:6379/0",
	} {
		st, err := Open(url)
		if err == nil {
			st.Close()
			t.Errorf("Open(%q) succeeded", url)
			continue
		}
		if strings.Contains(err.Error(), "s3cret-pw") {
			t.Errorf("Open(%q) = %v: the error repeats the password", url, err)
		}
	}

	// NewService touches nothing; Start fails without a server, and the
	// error holds no password.
	s, err := keys.NewService("redis://:s3cret-pw@127.0.0.1:1/0", nil)
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

// TestRedisKeyWithoutSettings reads a key of an older version, which
// has no settings field, as following its tier.
func TestRedisKeyWithoutSettings(t *testing.T) {
	st, srv := openRedisTemp(t)
	r, _ := storetest.CreateWith(t, st, keys.Attrs{Name: "old", Tier: "pro", Settings: storetest.FullSettings()}, time.Now())
	if err := redistest.Client(t, srv.URL).HDel(t.Context(), redisKeyPrefix+r.ID, "settings").Err(); err != nil {
		t.Fatal(err)
	}
	got, err := st.Get(t.Context(), r.ID)
	if err != nil {
		t.Fatal(err)
	}
	r.Settings = policy.Settings{}
	storetest.WantRecord(t, got, r)
}
