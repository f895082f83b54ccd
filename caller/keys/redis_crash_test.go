package keys

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	goredis "github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/internal/crashtest"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/store"
	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"
)

const (
	// redisCrashFlushEvery: the ledger is flushed after one key change
	// in this many, at random.
	redisCrashFlushEvery = 4

	// redisCrashCatchUp bounds how long the Service may take to be back
	// in sync after a restart: its poll runs every 20ms here, and the
	// first sync after a restart may meet a connection of the killed
	// server.
	redisCrashCatchUp = 5 * time.Second
)

// The Redis layout the crash test reads behind the store, spelled out as
// the operators' existing data has it, so that a change to it fails here.
const (
	redisKeyPrefix   = "vgt:key:"
	redisSeqKey      = "vgt:keys:seq"
	redisCounterKey  = "vgt:keys:counter"
	redisEpochKey    = "vgt:keys:epoch"
	redisUsagePrefix = "vgt:usage:"
	usageTTL         = 400 * 24 * time.Hour // of a day of usage, after its last write
	epochShift       = 48                   // a cursor is epoch<<epochShift | sequence
)

// redisUint reads a stored counter; a missing one is 0.
func redisUint(cmd *goredis.StringCmd) (uint64, error) {
	v, err := cmd.Uint64()
	if errors.Is(err, goredis.Nil) {
		return 0, nil
	}
	return v, err
}

// TestRedisCrashConsistency is TestSQLiteCrashConsistency for the Redis
// store, whose store process is redis-server: the test writes keys and
// usage to it and kills it (SIGKILL), 50 times, restarting it each time
// on the same port and data directory. After every restart the store must
// open and work; every key change acknowledged, in this run or an earlier
// one, must be there as acknowledged; the ledger must hold exactly the
// batches acknowledged as written, plus the one being written whole or
// not at all; and the change history that Changes cursors point into
// must have survived: neither a cursor taken before the kill nor a
// Service that polled through it may take the restart for a store reset.
//
// This holds only because the server is durable: an append-only file
// (AOF) written and fsynced before each answer (appendfsync always;
// everysec survives a kill of the process but may lose the last second
// to a crash of the machine). Without AOF a killed Redis comes back with
// its last RDB snapshot, or empty, losing every change since: which is why
// the README asks operators to give Redis persistence.
func TestRedisCrashConsistency(t *testing.T) {
	ctx := t.Context()
	// aof-load-truncated no: a kill can cut the append-only file inside
	// a MULTI/EXEC block (a script's effects), and Redis 7.0 told to load
	// such a file anyway truncates it after the last whole command, inside
	// the block: at the next restart, the cut block's first commands run
	// with the next block. Refused to start instead, it is repaired by
	// redis-check-aof, which truncates before the block, as an operator
	// does (see README).
	srv := redistest.StartWith(t, "--appendonly", "yes", "--appendfsync", "always", "--aof-load-truncated", "no")
	raw := redistest.Client(t, srv.URL)

	// A Service polls the store all along, as a running Caddy does. It
	// never writes last-used times (flushEvery), which would change the
	// records compared below.
	core, logs := observer.New(zapcore.InfoLevel)
	svc, err := NewService(srv.URL, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	svc.poll = 20 * time.Millisecond
	svc.flushEvery = time.Hour
	if err := svc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := svc.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})

	m := &redisCrashModel{
		keys:    make(map[string]store.Record),
		secrets: make(map[string]string),
		usage:   make(map[crashtest.Key]store.UsageRow),
	}
	var (
		begin                    = time.Now()
		keyAcks, uses, flushes   int
		minAcks, maxAcks         = math.MaxInt, 0
		minRun, maxRun           = time.Duration(math.MaxInt64), time.Duration(0)
		keyCuts, batchCuts       crashtest.Cuts
		landedUses, landedTokens int64

		// Time spent in all, and the longest of each kill.
		writing, restarting, checking, catchingUp time.Duration
		maxKill, maxRestart, maxCatchUp           time.Duration
	)
	st := openRedisCrash(t, 0, srv)
	t.Cleanup(func() { st.Close() }) // the last one
	for kill := 1; kill <= crashtest.Kills; kill++ {
		// Each run has a Ledger of its own: the batch its kill cut is
		// written again after the restart, as a Service does, and the
		// Ledger is then dropped.
		l := ledger.New(zap.NewNop())
		run := &redisCrashRun{changed: make(map[string]bool)}
		l.Attach(recordedUsage{st, run})

		started, done := make(chan time.Time, 1), make(chan struct{})
		go func() {
			defer close(done)
			m.write(ctx, kill, st, l, run, started)
		}()
		begun := time.Now()
		var first time.Time
		select {
		case first = <-started:
			select {
			case <-time.After(crashtest.MinRun + rand.N(crashtest.MaxRun-crashtest.MinRun)):
			case <-done:
			}
		case <-done:
		}
		killedAt := time.Now()
		srv.Kill(t)
		maxKill = max(maxKill, time.Since(killedAt))
		<-done
		st.Close()
		if !first.IsZero() {
			run.ran = killedAt.Sub(first)
		}
		if run.errAt.Before(killedAt) {
			t.Fatalf("kill %d: a write failed before the kill, after %d key changes and %d flushes: %v",
				kill, run.keyAcks, run.flushes, run.err)
		}

		restarted := time.Now()
		writing += restarted.Sub(begun)
		repairAOF(t, srv.Dir())
		srv.Restart(t)
		checkAOFLoaded(t, kill, raw)
		st = openRedisCrash(t, kill, srv)
		d := time.Since(restarted)
		restarting += d
		maxRestart = max(maxRestart, d)

		checked := time.Now()
		landed := m.checkKeys(t, kill, st, raw, run)
		batchLanded := m.checkUsage(t, kill, raw, run)
		checking += time.Since(checked)
		catchUp := m.checkService(t, kill, svc, logs)
		catchingUp += catchUp
		maxCatchUp = max(maxCatchUp, catchUp)

		// A failed flush keeps its batch in the Ledger as it was, and the
		// next flush writes it again: it must count once, whether or not
		// it landed before the kill.
		if run.batch != nil {
			var kept []crashtest.Use
			for _, r := range l.Retrying() {
				kept = append(kept, crashtest.Use{Row: r})
			}
			if want := usageOf(run.batch); !maps.Equal(usageOf(kept), want) {
				t.Errorf("kill %d: the Ledger keeps%s\nafter its write failed", kill, crashtest.UsageDiff(usageOf(kept), want))
			}
			l.Attach(st)
			if err := l.Flush(ctx); err != nil {
				t.Fatalf("kill %d: writing the failed batch again: %v", kill, err)
			}
			want := m.usage
			if !batchLanded {
				want = crashtest.WithUses(m.usage, run.batch)
			}
			if got := storedUsage(t, kill, raw); !maps.Equal(got, want) {
				t.Errorf("kill %d: after the failed batch was written again (it had landed: %t), the ledger differs%s",
					kill, batchLanded, crashtest.UsageDiff(got, want))
			}
			m.usage = want
			if batchLanded {
				for _, u := range run.batch {
					landedUses += u.Row.Requests
					landedTokens += u.Row.TotalTokens()
				}
			}
		}

		keyCuts.Add(run.inflightOp != "", landed)
		batchCuts.Add(run.batch != nil, batchLanded)
		keyAcks += run.keyAcks
		uses += run.uses
		flushes += run.flushes
		minAcks, maxAcks = min(minAcks, run.keyAcks), max(maxAcks, run.keyAcks)
		minRun, maxRun = min(minRun, run.ran), max(maxRun, run.ran)
		t.Logf("kill %2d, %3dms into writing: %3d key changes, %3d uses, %2d flushes; cut: key %q landed %t, batch %t landed %t; Service back in %v",
			kill, run.ran.Milliseconds(), run.keyAcks, run.uses, run.flushes,
			run.inflightOp, landed, run.batch != nil, batchLanded, catchUp.Round(time.Millisecond))
	}

	// The store works after the last restart too: a new key reaches the
	// Service, which proves the change counter went on from where it was.
	r, secret := create(t, st, "after-the-last-kill", "pro", time.Time{}, time.Now())
	waitFor(t, redisCrashCatchUp, "a key added after the last restart works", func() bool {
		c, ok := svc.Identify(secret, time.Now())
		return ok && c == caller.Client{ID: r.ID, Name: r.Name, Tier: r.Tier}
	})
	if _, _, err := st.Changes(ctx, m.cursor); err != nil {
		t.Errorf("Changes after the last restart: %v", err)
	}

	var requests, tokens int64
	for _, r := range m.usage {
		requests += r.Requests
		tokens += r.TotalTokens()
	}
	live := 0
	for _, r := range m.keys {
		if r.Revoked.IsZero() {
			live++
		}
	}
	ms := func(d time.Duration) time.Duration { return d.Round(time.Millisecond) }
	t.Logf("%d kills in %v: %v writing, %v restarting, %v checking the store, %v waiting for the Service",
		crashtest.Kills, ms(time.Since(begin)), ms(writing), ms(restarting), ms(checking), ms(catchingUp))
	t.Logf("the longest: a kill %v, a restart %v (the AOF loaded, the store open), the Service back in sync %v",
		ms(maxKill), ms(maxRestart), ms(maxCatchUp))
	t.Logf("acknowledged: %d key changes (%d to %d a run), %d uses in %d flushes; killed %v to %v after the first write",
		keyAcks, minAcks, maxAcks, uses, flushes, ms(minRun), ms(maxRun))
	t.Logf("key changes cut by the kill: %v; %d keys at the end, %d live", keyCuts, len(m.keys), live)
	t.Logf("ledger batches cut by the kill: %v; %d rows hold %d requests, %d tokens",
		batchCuts, len(m.usage), requests, tokens)
	t.Logf("the %d batches that landed hold %d uses, %d tokens: their writes failed, the Ledger wrote them again, and they counted once",
		batchCuts.Landed, landedUses, landedTokens)
	t.Logf("the Service logged %d failing syncs and %d store resets; the AOF has %s bytes",
		logs.FilterMessage("reading key changes failed; retrying").Len(),
		logs.FilterMessage("key store was emptied or restored: reloading every key").Len(),
		infoField(t, raw, "aof_current_size"))
}

// openRedisCrash opens the store on srv, after the kill-th restart.
func openRedisCrash(t *testing.T, kill int, srv *redistest.Server) *redisstore.Store {
	t.Helper()
	st, err := openAfterRestart(srv.URL)
	if err != nil {
		t.Fatalf("kill %d: the store does not open after the restart: %v", kill, err)
	}
	return st
}

// infoField returns a field of the server's INFO, or "?".
func infoField(t *testing.T, raw *goredis.Client, name string) string {
	info, err := raw.Info(t.Context()).Result()
	if err != nil {
		return "?"
	}
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
			return v
		}
	}
	return "?"
}

// checkAOFLoaded checks that the restarted server runs with its
// append-only file, loaded.
func checkAOFLoaded(t *testing.T, kill int, raw *goredis.Client) {
	t.Helper()
	info, err := raw.Info(t.Context(), "persistence").Result()
	if err != nil {
		t.Fatalf("kill %d: INFO persistence: %v", kill, err)
	}
	for _, want := range []string{"loading:0", "aof_enabled:1"} {
		if !strings.Contains(info, want+"\r\n") {
			t.Fatalf("kill %d: the restarted server's INFO lacks %q:\n%s", kill, want, info)
		}
	}
}

// redisCrashModel is what the store must hold: every acknowledged key
// change, the ledger as stored at the last check, and what the Service
// must make of the keys.
type redisCrashModel struct {
	keys    map[string]store.Record
	secrets map[string]string // each key's secret; "" when a cut change left it unknown
	dead    []string          // secrets that must not work: rotated away, or of revoked keys
	usage   map[crashtest.Key]store.UsageRow
	cursor  uint64 // of Changes, as of the last check
	epoch   uint64 // the store's, once it has one
}

// bury notes that the secret of key id must no longer work.
func (m *redisCrashModel) bury(id string) {
	if s := m.secrets[id]; s != "" {
		m.dead = append(m.dead, s)
	}
	m.secrets[id] = ""
}

// redisCrashRun is what one run of writes, ended by a kill, acknowledged.
// The writing goroutine owns it until it ends.
type redisCrashRun struct {
	keyAcks, uses, flushes int
	changed                map[string]bool // keys whose change was acknowledged
	ran                    time.Duration   // from the first acknowledgement to the kill

	inflightOp string        // the key change that failed: "create", "rotate", "revoke" or ""
	inflight   *store.Record // the key as that change would leave it; for a rotation, the old hash

	flushed []crashtest.Use // in acknowledged batches
	batch   []crashtest.Use // in the batch whose write failed
	pending []crashtest.Use // added, in no batch yet

	err   error // that ended the run
	errAt time.Time
}

// write changes keys and records usage in st until a write fails, which
// it notes in run. It sends the time of its first acknowledgement on
// started. Acknowledged key changes go to m at once.
func (m *redisCrashModel) write(ctx context.Context, kill int, st *redisstore.Store, l *ledger.Ledger, run *redisCrashRun, started chan<- time.Time) {
	fail := func(op string, r *store.Record, err error) {
		run.inflightOp, run.inflight = op, r
		run.err, run.errAt = err, time.Now()
	}
	var live []string
	for id, r := range m.keys {
		if r.Revoked.IsZero() {
			live = append(live, id)
		}
	}
	slices.Sort(live)
	for n := 0; ; n++ {
		// A quarter of the changes are new keys: the checks after each
		// kill read every key, and fewer keys keep them quick.
		switch op := rand.IntN(20); {
		case op < 5 || len(live) == 0:
			now := store.StoredTime(time.Now())
			want := store.Record{Name: fmt.Sprintf("crash-%d-%d", kill, n), Tier: crashtest.Tiers[rand.IntN(len(crashtest.Tiers))], Created: now}
			if rand.IntN(2) == 0 {
				want.Expires = now.Add(720 * time.Hour)
			}
			r, secret, err := Create(ctx, st, Attrs{Name: want.Name, Tier: want.Tier, Expires: want.Expires}, now)
			if err != nil {
				fail("create", &want, err)
				return
			}
			m.keys[r.ID], m.secrets[r.ID] = r, secret
			run.changed[r.ID] = true
			live = append(live, r.ID)
		case op < 16:
			id := live[rand.IntN(len(live))]
			r := m.keys[id]
			secret, err := Rotate(ctx, st, id)
			if err != nil {
				fail("rotate", &r, err)
				return
			}
			r.Hash = store.HashSecret(secret)
			m.keys[id] = r
			m.bury(id)
			m.secrets[id] = secret
			run.changed[id] = true
		default:
			i := rand.IntN(len(live))
			id := live[i]
			r := m.keys[id]
			r.Revoked = store.StoredTime(time.Now())
			if err := st.Revoke(ctx, id, r.Revoked); err != nil {
				fail("revoke", &r, err)
				return
			}
			m.keys[id] = r
			m.bury(id)
			run.changed[id] = true
			live[i] = live[len(live)-1]
			live = live[:len(live)-1]
		}
		if run.keyAcks++; run.keyAcks == 1 {
			started <- time.Now()
		}

		// Usage takes the product's path: Ledger.Add in memory, then
		// Ledger.flush writing the batch to Redis.AddUsage in one
		// transaction. The Service flushes every ledgerFlushInterval;
		// here a flush follows one key change in redisCrashFlushEvery,
		// so that a good share of the kills cut a batch.
		for range 1 + rand.IntN(3) {
			client, model := crashtest.Clients[rand.IntN(len(crashtest.Clients))], crashtest.Models[rand.IntN(len(crashtest.Models))]
			prompt, completion := 1+rand.Int64N(2000), rand.Int64N(1000)
			at := time.Now()
			l.Add(client, model, at, ledger.Tokens{Prompt: prompt, Completion: completion})
			run.uses++
			run.pending = append(run.pending, crashtest.Use{
				Row: store.UsageRow{Client: client, Day: store.Day(at), Model: model, Requests: 1, PromptTokens: prompt, CompletionTokens: completion},
				At:  at,
			})
		}
		if rand.IntN(redisCrashFlushEvery) == 0 {
			if err := l.Flush(ctx); err != nil {
				run.err, run.errAt = err, time.Now()
				return
			}
		}
	}
}

// usageOf returns the ledger rows that uses make.
func usageOf(uses []crashtest.Use) map[crashtest.Key]store.UsageRow {
	return crashtest.WithUses(make(map[crashtest.Key]store.UsageRow), uses)
}

// recordedUsage is the ledger's store in the test: it notes the batch it
// writes, and that the write was acknowledged.
type recordedUsage struct {
	*redisstore.Store
	run *redisCrashRun
}

func (u recordedUsage) AddUsage(ctx context.Context, b store.UsageBatch) error {
	// The batch must be exactly the uses added since the last one.
	var batch []crashtest.Use
	for _, r := range b.Rows {
		batch = append(batch, crashtest.Use{Row: r})
	}
	if got, want := usageOf(batch), usageOf(u.run.pending); !maps.Equal(got, want) {
		return fmt.Errorf("the ledger flushes a batch other than the uses added since its last flush:%s", crashtest.UsageDiff(got, want))
	}
	u.run.batch, u.run.pending = u.run.pending, nil
	if err := u.Store.AddUsage(ctx, b); err != nil {
		return err
	}
	u.run.flushed = append(u.run.flushed, u.run.batch...)
	u.run.batch = nil
	u.run.flushes++
	return nil
}

// checkKeys checks that st holds every acknowledged key as acknowledged,
// and nothing else but the result of the change that failed, if any; that
// the change history is whole; and that Changes from the cursor of the
// last check answers the keys changed since, not a reset. It then takes
// what st holds as the model, and reports whether the failed change
// landed.
func (m *redisCrashModel) checkKeys(t *testing.T, kill int, st *redisstore.Store, raw *goredis.Client, run *redisCrashRun) (landed bool) {
	t.Helper()
	ctx := t.Context()
	recs, err := st.List(ctx)
	if err != nil {
		t.Fatalf("kill %d: listing keys: %v", kill, err)
	}
	stored := make(map[string]store.Record, len(recs))
	for _, r := range recs {
		stored[r.ID] = r
	}
	landed, created := crashtest.CheckAcknowledged(t, kill, stored, m.keys, run.inflightOp, run.inflight)

	// What the Service must make of the keys now.
	if landed {
		switch run.inflightOp {
		case "create":
			run.changed[created] = true
		case "rotate", "revoke":
			id := run.inflight.ID
			m.bury(id) // rotated: the new secret is lost; revoked: of no use
			run.changed[id] = true
		}
	}
	m.keys = stored

	epoch := checkRedisHistory(t, kill, raw)
	if m.epoch == 0 {
		m.epoch = epoch
	} else if epoch != m.epoch {
		t.Errorf("kill %d: the store's epoch is %d, was %d: the restart looks like a reset", kill, epoch, m.epoch)
	}

	// A cursor taken before the kill reads on after the restart.
	changes, cursor, err := st.Changes(ctx, m.cursor)
	if errors.Is(err, store.ErrReset) {
		t.Fatalf("kill %d: Changes from the cursor of before the kill: %v: the restart is taken for a reset", kill, err)
	}
	if err != nil {
		t.Fatalf("kill %d: reading changes: %v", kill, err)
	}
	got := make(map[string]bool, len(changes))
	for _, r := range changes {
		got[r.ID] = true
	}
	if !maps.Equal(got, run.changed) {
		t.Errorf("kill %d: Changes from the last check answers %d keys, want the %d changed since: %v\nwant %v",
			kill, len(got), len(run.changed), slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(run.changed)))
	}
	if cursor>>epochShift != m.epoch {
		t.Errorf("kill %d: Changes returns a cursor of epoch %d, want %d", kill, cursor>>epochShift, m.epoch)
	}
	m.cursor = cursor
	return landed
}

// checkRedisHistory checks what Changes relies on: every key has a hash
// and a place in the seq set, with the same seq in both; the newest
// change has the counter's seq. It returns the epoch.
func checkRedisHistory(t *testing.T, kill int, raw *goredis.Client) (epoch uint64) {
	t.Helper()
	ctx := t.Context()
	var (
		seqs             *goredis.ZSliceCmd
		counter, epochAt *goredis.StringCmd
		hashes           *goredis.StringSliceCmd
	)
	_, err := raw.TxPipelined(ctx, func(p goredis.Pipeliner) error {
		seqs = p.ZRangeWithScores(ctx, redisSeqKey, 0, -1)
		counter = p.Get(ctx, redisCounterKey)
		epochAt = p.Get(ctx, redisEpochKey)
		hashes = p.Keys(ctx, redisKeyPrefix+"*")
		return nil
	})
	if err != nil && !errors.Is(err, goredis.Nil) {
		t.Fatalf("kill %d: reading the change history: %v", kill, err)
	}
	n, err := redisUint(counter)
	if err != nil {
		t.Fatalf("kill %d: reading the counter: %v", kill, err)
	}
	if epoch, err = redisUint(epochAt); err != nil {
		t.Fatalf("kill %d: reading the epoch: %v", kill, err)
	}
	if len(hashes.Val()) != len(seqs.Val()) {
		t.Errorf("kill %d: %d key hashes, %d keys in the seq set", kill, len(hashes.Val()), len(seqs.Val()))
	}
	cmds := make([]*goredis.StringCmd, len(seqs.Val()))
	if _, err := raw.Pipelined(ctx, func(p goredis.Pipeliner) error {
		for i, z := range seqs.Val() {
			cmds[i] = p.HGet(ctx, redisKeyPrefix+z.Member.(string), "seq")
		}
		return nil
	}); err != nil {
		t.Fatalf("kill %d: reading seqs: %v", kill, err)
	}
	var newest uint64
	for i, z := range seqs.Val() {
		newest = max(newest, uint64(z.Score))
		if s, err := cmds[i].Result(); err != nil || s != strconv.FormatUint(uint64(z.Score), 10) {
			t.Errorf("kill %d: key %s has seq %q (%v), %d in the seq set", kill, z.Member, s, err, uint64(z.Score))
		}
	}
	if newest != n {
		t.Errorf("kill %d: the newest key change has seq %d, the counter is at %d", kill, newest, n)
	}
	if n > 0 && epoch == 0 {
		t.Errorf("kill %d: %d changes, but no epoch", kill, n)
	}
	return epoch
}

// checkUsage checks that the stored ledger is the one of the last check
// plus every acknowledged batch, plus the batch whose write failed whole
// or not at all, and that every day of it still expires. It then takes
// the stored ledger as the model, and reports whether the failed batch
// landed.
func (m *redisCrashModel) checkUsage(t *testing.T, kill int, raw *goredis.Client, run *redisCrashRun) (landed bool) {
	t.Helper()
	stored := storedUsage(t, kill, raw)
	landed = crashtest.CompareLedger(t, kill, m.usage, stored, run.flushed, run.batch)
	m.usage = stored
	return landed
}

// storedUsage reads the whole ledger from Redis, checking that every day
// of it expires.
func storedUsage(t *testing.T, kill int, raw *goredis.Client) map[crashtest.Key]store.UsageRow {
	t.Helper()
	ctx := t.Context()
	keys, err := raw.Keys(ctx, redisUsagePrefix+"*").Result()
	if err != nil {
		t.Fatalf("kill %d: reading the ledger: %v", kill, err)
	}
	hashes := make([]*goredis.MapStringStringCmd, len(keys))
	ttls := make([]*redis.DurationCmd, len(keys))
	if _, err := raw.Pipelined(ctx, func(p goredis.Pipeliner) error {
		for i, k := range keys {
			hashes[i], ttls[i] = p.HGetAll(ctx, k), p.PTTL(ctx, k)
		}
		return nil
	}); err != nil {
		t.Fatalf("kill %d: reading the ledger: %v", kill, err)
	}
	stored := make(map[crashtest.Key]store.UsageRow)
	for i, k := range keys {
		rest := strings.TrimPrefix(k, redisUsagePrefix)
		client, day := rest[:len(rest)-len("2006-01-02")-1], rest[len(rest)-len("2006-01-02"):]
		if ttl := ttls[i].Val(); ttl <= 0 || ttl > usageTTL {
			t.Errorf("kill %d: ledger day %s expires in %v, want at most %v", kill, k, ttl, usageTTL)
		}
		for field, v := range hashes[i].Val() {
			model, what, ok := strings.Cut(field, "\x00")
			n, err := strconv.ParseInt(v, 10, 64)
			if !ok || err != nil {
				t.Fatalf("kill %d: ledger day %s has %q = %q", kill, k, field, v)
			}
			lk := crashtest.Key{Client: client, Day: day, Model: model}
			r := stored[lk]
			r.Client, r.Day, r.Model = client, day, model
			switch what {
			case "requests":
				r.Requests = n
			case "prompt":
				r.PromptTokens = n
			case "completion":
				r.CompletionTokens = n
			case "cached":
				r.CachedTokens = n
			case "reasoning":
				r.ReasoningTokens = n
			case "cost":
				r.Cost = n
			default:
				t.Fatalf("kill %d: ledger day %s has field %q", kill, k, field)
			}
			stored[lk] = r
		}
	}
	return stored
}

// checkService waits until svc, which polled the store through the kill,
// identifies every live key with a known secret as stored, and refuses
// every secret rotated away or revoked; and checks that it never took a
// restart for a reset of the store. It returns how long it waited.
func (m *redisCrashModel) checkService(t *testing.T, kill int, svc *Service, logs *observer.ObservedLogs) time.Duration {
	t.Helper()
	begin := time.Now()
	var wrong string
	deadline := begin.Add(redisCrashCatchUp)
	for {
		wrong = m.serviceWrong(svc)
		if wrong == "" || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if wrong != "" {
		t.Errorf("kill %d: %s, %v after the restart", kill, wrong, redisCrashCatchUp)
	}
	if n := logs.FilterMessage("key store was emptied or restored: reloading every key").Len(); n > 0 {
		t.Fatalf("kill %d: the Service took the durable store for a reset, %d times", kill, n)
	}
	return time.Since(begin)
}

// serviceWrong returns the first thing svc gets wrong, or "".
func (m *redisCrashModel) serviceWrong(svc *Service) string {
	now := time.Now()
	for id, r := range m.keys {
		secret := m.secrets[id]
		if secret == "" || !r.Revoked.IsZero() {
			continue
		}
		if c, ok := svc.Identify(secret, now); !ok || c != (caller.Client{ID: id, Name: r.Name, Tier: r.Tier}) {
			return fmt.Sprintf("the Service identifies live key %s as %+v, %t", id, c, ok)
		}
	}
	for _, secret := range m.dead {
		if c, ok := svc.Identify(secret, now); ok {
			return fmt.Sprintf("the Service accepts a rotated or revoked secret of key %s", c.ID)
		}
	}
	return ""
}

// repairAOF runs redis-check-aof --fix on the append-only file in dir, as
// an operator does when Redis refuses to load a file a crash cut short; a
// whole file is left as it is.
func repairAOF(t *testing.T, dir string) {
	t.Helper()
	cmd := exec.Command("redis-check-aof", "--fix", filepath.Join(dir, "appendonlydir", "appendonly.aof.manifest"))
	cmd.Stdin = strings.NewReader("y\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("redis-check-aof --fix: %v\n%s", err, out)
	}
}
