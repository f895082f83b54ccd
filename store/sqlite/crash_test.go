package sqlite

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/crashtest"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/store"
	"go.uber.org/zap"
)

// crashStoreEnv holds the database path when the test binary runs as the
// store process of TestSQLiteCrashConsistency.
const crashStoreEnv = "VIGTHORIA_CRASH_STORE"

// TestSQLiteCrashConsistency kills a process writing keys and usage to a
// SQLite store, 50 times, on one database file. After every kill the
// store must open and pass SQLite's integrity check; every key change the
// process acknowledged, in this run or an earlier one, must be there; and
// the ledger must hold exactly the batches acknowledged as written (plus
// the one being written, whole or not at all), so that only uses added in
// memory since the last flush are lost, all within ledgerFlushInterval,
// the lag the ledger documents.
// ledgerFlushInterval is the key service's: how far the stored ledger
// may lag, and so what a kill may lose.
const ledgerFlushInterval = time.Second

func TestSQLiteCrashConsistency(t *testing.T) {
	// Re-executed by runStoreProcess: be the store process.
	if path := os.Getenv(crashStoreEnv); path != "" {
		err := runCrashStore(path)
		fmt.Fprintln(os.Stderr, "store process:", err)
		os.Exit(2)
	}

	path := filepath.Join(t.TempDir(), "crash.db")
	m := crashModel{keys: make(map[string]store.Record), usage: make(map[crashtest.Key]store.UsageRow)}
	var (
		begin                          = time.Now()
		acks, minAcks, maxAcks         = 0, math.MaxInt, 0
		minRun, maxRun                 = time.Duration(math.MaxInt64), time.Duration(0)
		keyCuts, batchCuts             crashtest.Cuts
		lostUses, lostTokens, lostRuns int
		oldestLoss                     time.Duration
	)
	for kill := 1; kill <= crashtest.Kills; kill++ {
		lines, killedAt, ran := runStoreProcess(t, path, crashtest.MinRun+rand.N(crashtest.MaxRun-crashtest.MinRun))
		run := m.apply(t, kill, lines)

		st, err := Open(path)
		if err != nil {
			t.Fatalf("kill %d: the store does not open after the kill: %v", kill, err)
		}
		checkIntegrity(t, kill, st)
		keyLanded := m.checkKeys(t, kill, st, run)
		lost, batchLanded := m.checkUsage(t, kill, st, run)
		if err := st.Close(); err != nil {
			t.Fatalf("kill %d: closing: %v", kill, err)
		}

		for _, u := range lost {
			age := killedAt.Sub(u.At)
			if age >= ledgerFlushInterval {
				t.Errorf("kill %d: a use of %s on %s (%d tokens) was lost %v after it was added, beyond the ledger's documented lag of %v",
					kill, u.Row.Client, u.Row.Model, u.Row.TotalTokens(), age, ledgerFlushInterval)
			}
			oldestLoss = max(oldestLoss, age)
			lostTokens += int(u.Row.TotalTokens())
		}
		lostUses += len(lost)
		if len(lost) > 0 {
			lostRuns++
		}
		keyCuts.Add(run.inflight != nil, keyLanded)
		batchCuts.Add(run.batch != nil, batchLanded)
		n := len(lines)
		acks += n
		minAcks, maxAcks = min(minAcks, n), max(maxAcks, n)
		minRun, maxRun = min(minRun, ran), max(maxRun, ran)
		t.Logf("kill %2d, %3dms into writing: %4d lines: %3d key changes, %3d uses, %2d flushes; cut: key %q, batch %t; lost %d uses",
			kill, ran.Milliseconds(), n, run.keyAcks, run.uses, run.flushes, run.inflightOp, run.batch != nil, len(lost))
	}

	var requests, tokens int64
	for _, r := range m.usage {
		requests += r.Requests
		tokens += r.TotalTokens()
	}
	t.Logf("%d kills in %v", crashtest.Kills, time.Since(begin).Round(time.Millisecond))
	t.Logf("lines read per process: %d to %d, %d in all; killed %v to %v after the first write",
		minAcks, maxAcks, acks, minRun.Round(time.Millisecond), maxRun.Round(time.Millisecond))
	t.Logf("key changes cut by the kill: %v; %d keys at the end", keyCuts, len(m.keys))
	t.Logf("ledger batches cut by the kill: %v; %d rows hold %d requests, %d tokens",
		batchCuts, len(m.usage), requests, tokens)
	t.Logf("ledger loss: %d uses (%d tokens) in %d of %d kills, the oldest %v before its kill; documented window %v, flushed every %v here",
		lostUses, lostTokens, lostRuns, crashtest.Kills, oldestLoss.Round(time.Microsecond), ledgerFlushInterval, crashtest.LedgerFlush)
}

// runStoreProcess runs the store process on the database at path, kills
// it with SIGKILL after it has written for about writeFor, and returns the
// lines it wrote, when it was killed and how long it had written by then.
func runStoreProcess(t *testing.T, path string, writeFor time.Duration) (lines []string, killedAt time.Time, ran time.Duration) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestSQLiteCrashConsistency$")
	cmd.Env = append(os.Environ(), crashStoreEnv+"="+path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the store process: %v", err)
	}
	started, done := make(chan time.Time, 1), make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if lines = append(lines, sc.Text()); len(lines) == 1 {
				started <- time.Now()
			}
		}
	}()

	exited := false
	select {
	case first := <-started:
		select {
		case <-time.After(writeFor):
		case <-done:
			exited = true
		}
		ran = time.Since(first)
	case <-done:
		exited = true
	case <-time.After(crashtest.StartTimeout):
	}
	killedAt = time.Now()
	if err := cmd.Process.Kill(); err != nil {
		exited = true
	}
	<-done
	_ = cmd.Wait() // killed: the error says so
	switch {
	case exited:
		t.Fatalf("the store process ended before it was killed, after %d lines: %s", len(lines), stderr.Bytes())
	case stderr.Len() > 0:
		t.Fatalf("the store process wrote to stderr: %s", stderr.Bytes())
	case len(lines) == 0:
		t.Fatalf("the store process wrote nothing in %v", crashtest.StartTimeout)
	}
	return lines, killedAt, ran
}

// runCrashStore is the store process: it changes keys and records usage
// in the SQLite store at path until it is killed. On stdout it announces
// each key change before making it and acknowledges it once the store
// returned, so that the parent knows which change a kill may have cut.
// It returns only on a failure.
func runCrashStore(path string) error {
	ctx := context.Background()
	st, err := Open(path)
	if err != nil {
		return err
	}
	recs, err := st.List(ctx)
	if err != nil {
		return err
	}
	var live []string
	for _, r := range recs {
		if r.Revoked.IsZero() {
			live = append(live, r.ID)
		}
	}

	// Usage takes the product's own path: Ledger.Add in memory, then
	// Ledger.flush writing the batch to SQLite.AddUsage in one
	// transaction. The Service calls flush every ledgerFlushInterval;
	// here it runs every crashtest.LedgerFlush, so that 50 kills take seconds
	// and most find usage both stored and pending. What a kill can lose,
	// the uses added since the last flush began, does not depend on the
	// period. One goroutine does everything, so that the order of the
	// lines is the order of the writes.
	l := ledger.New(zap.NewNop())
	l.Attach(ackedUsage{st})
	flushed := time.Now()
	for n := 0; ; n++ {
		switch op := rand.IntN(10); {
		case op < 4 || len(live) == 0:
			id, err := crashCreate(ctx, st, n)
			if err != nil {
				return err
			}
			live = append(live, id)
		case op < 8:
			if err := crashRotate(ctx, st, live[rand.IntN(len(live))]); err != nil {
				return err
			}
		default:
			i := rand.IntN(len(live))
			if err := crashRevoke(ctx, st, live[i]); err != nil {
				return err
			}
			live[i] = live[len(live)-1]
			live = live[:len(live)-1]
		}

		for range 1 + rand.IntN(3) {
			client, model := crashtest.Clients[rand.IntN(len(crashtest.Clients))], crashtest.Models[rand.IntN(len(crashtest.Models))]
			prompt, completion := 1+rand.Int64N(2000), rand.Int64N(1000)
			at := time.Now()
			l.Add(client, model, at, ledger.Tokens{Prompt: prompt, Completion: completion})
			ack("use %s %s %s %d %d %d", client, store.Day(at), model, prompt, completion, at.UnixNano())
		}
		if time.Since(flushed) >= crashtest.LedgerFlush {
			if err := l.Flush(ctx); err != nil {
				return err
			}
			flushed = time.Now()
		}
	}
}

func crashCreate(ctx context.Context, st store.Backend, n int) (string, error) {
	name := fmt.Sprintf("crash-%d-%d", os.Getpid(), n)
	tier := crashtest.Tiers[rand.IntN(len(crashtest.Tiers))]
	now := store.StoredTime(time.Now())
	var expires time.Time
	if rand.IntN(2) == 0 {
		expires = now.Add(720 * time.Hour)
	}
	ack("begin create %s %s %d %d", name, tier, store.Millis(now), store.Millis(expires))
	r, _, err := keys.Create(ctx, st, keys.Attrs{Name: name, Tier: tier, Expires: expires}, now)
	if err != nil {
		return "", err
	}
	ack("create %s %x", r.ID, r.Hash)
	return r.ID, nil
}

func crashRotate(ctx context.Context, st store.Backend, id string) error {
	ack("begin rotate %s", id)
	secret, err := keys.Rotate(ctx, st, id)
	if err != nil {
		return err
	}
	ack("rotate %s %x", id, store.HashSecret(secret))
	return nil
}

func crashRevoke(ctx context.Context, st store.Backend, id string) error {
	at := store.StoredTime(time.Now())
	ack("begin revoke %s %d", id, store.Millis(at))
	if err := st.Revoke(ctx, id, at); err != nil {
		return err
	}
	ack("revoke %s", id)
	return nil
}

// ackedUsage is the store process's ledger store: it announces each batch
// with its totals before writing it, and acknowledges it once committed.
type ackedUsage struct{ *Store }

func (a ackedUsage) AddUsage(ctx context.Context, b store.UsageBatch) error {
	var requests, tokens int64
	for _, r := range b.Rows {
		requests += r.Requests
		tokens += r.TotalTokens()
	}
	ack("flushing %d %d", requests, tokens)
	if err := a.Store.AddUsage(ctx, b); err != nil {
		return err
	}
	ack("flushed")
	return nil
}

// ack writes one line to the parent, in one write to the pipe, which a
// kill cannot tear.
func ack(format string, args ...any) {
	fmt.Printf(format+"\n", args...)
}

// crashModel is what the store must hold: every acknowledged key change,
// and the ledger as stored at the last check.
type crashModel struct {
	keys  map[string]store.Record
	usage map[crashtest.Key]store.UsageRow
}

// crashRun is what one store process acknowledged.
type crashRun struct {
	keyAcks, uses, flushes int

	inflightOp string        // the key change announced and not acknowledged: "create", "rotate", "revoke" or ""
	inflight   *store.Record // the key as that change would leave it; for a rotation, the old hash

	flushed []crashtest.Use // in acknowledged batches
	batch   []crashtest.Use // in the batch announced and not acknowledged
	pending []crashtest.Use // added, in no batch yet
}

// apply reads a store process's lines, adds its acknowledged key changes
// to m and returns what it acknowledged.
func (m *crashModel) apply(t *testing.T, kill int, lines []string) *crashRun {
	t.Helper()
	run := new(crashRun)
	for _, line := range lines {
		f := strings.Fields(line)
		bad := func() { t.Fatalf("kill %d: unexpected line from the store process: %q", kill, line) }
		num := func(s string) int64 {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil {
				bad()
			}
			return n
		}
		hash := func(s string) store.Hash {
			var h store.Hash
			if b, err := hex.DecodeString(s); err != nil || len(b) != len(h) {
				bad()
			} else {
				copy(h[:], b)
			}
			return h
		}
		known := func(id string) store.Record {
			r, ok := m.keys[id]
			if !ok {
				t.Fatalf("kill %d: the store process changes key %s, which no process created", kill, id)
			}
			return r
		}
		// Each acknowledgement must follow the announcement of its change.
		finish := func(op, id string) *store.Record {
			if run.inflightOp != op || op != "create" && run.inflight.ID != id {
				bad()
			}
			r := run.inflight
			run.inflightOp, run.inflight = "", nil
			run.keyAcks++
			return r
		}

		switch {
		case len(f) == 6 && f[0] == "begin" && f[1] == "create":
			run.inflightOp = "create"
			run.inflight = &store.Record{Name: f[2], Tier: f[3], Created: store.FromMillis(num(f[4])), Expires: store.FromMillis(num(f[5]))}
		case len(f) == 3 && f[0] == "begin" && f[1] == "rotate":
			r := known(f[2])
			run.inflightOp, run.inflight = "rotate", &r
		case len(f) == 4 && f[0] == "begin" && f[1] == "revoke":
			r := known(f[2])
			r.Revoked = store.FromMillis(num(f[3]))
			run.inflightOp, run.inflight = "revoke", &r
		case len(f) == 3 && f[0] == "create":
			r := finish("create", "")
			r.ID, r.Hash = f[1], hash(f[2])
			m.keys[r.ID] = *r
		case len(f) == 3 && f[0] == "rotate":
			r := finish("rotate", f[1])
			r.Hash = hash(f[2])
			m.keys[r.ID] = *r
		case len(f) == 2 && f[0] == "revoke":
			r := finish("revoke", f[1])
			m.keys[r.ID] = *r
		case len(f) == 7 && f[0] == "use":
			run.uses++
			run.pending = append(run.pending, crashtest.Use{
				Row: store.UsageRow{Client: f[1], Day: f[2], Model: f[3], Requests: 1, PromptTokens: num(f[4]), CompletionTokens: num(f[5])},
				At:  time.Unix(0, num(f[6])),
			})
		case len(f) == 3 && f[0] == "flushing":
			// The batch must be exactly the uses added since the last one.
			var requests, tokens int64
			for _, u := range run.pending {
				requests += u.Row.Requests
				tokens += u.Row.TotalTokens()
			}
			if run.batch != nil || num(f[1]) != requests || num(f[2]) != tokens {
				t.Fatalf("kill %d: the ledger flushes %s requests and %s tokens; %d and %d were added since its last flush",
					kill, f[1], f[2], requests, tokens)
			}
			run.batch, run.pending = run.pending, nil
		case len(f) == 1 && f[0] == "flushed":
			if run.batch == nil {
				bad()
			}
			run.flushed = append(run.flushed, run.batch...)
			run.batch = nil
			run.flushes++
		default:
			bad()
		}
	}
	return run
}

// checkKeys checks that st holds every acknowledged key as acknowledged,
// and nothing else but the result of the change in flight, if any. It
// then takes what st holds as the model, and reports whether the change
// in flight landed.
func (m *crashModel) checkKeys(t *testing.T, kill int, st *Store, run *crashRun) (landed bool) {
	t.Helper()
	recs, err := st.List(t.Context())
	if err != nil {
		t.Fatalf("kill %d: listing keys: %v", kill, err)
	}
	stored := make(map[string]store.Record, len(recs))
	for _, r := range recs {
		stored[r.ID] = r
	}
	landed, _ = crashtest.CheckAcknowledged(t, kill, stored, m.keys, run.inflightOp, run.inflight)
	m.keys = stored

	// A change and its sequence number are written in one transaction.
	var newest, counter int64
	err = st.DB().QueryRowContext(t.Context(),
		`SELECT coalesce(max(seq), 0), (SELECT value FROM sequences WHERE name = 'keys') FROM keys`).Scan(&newest, &counter)
	if err != nil {
		t.Fatalf("kill %d: reading sequence numbers: %v", kill, err)
	}
	if newest != counter {
		t.Errorf("kill %d: the newest key change has seq %d, the counter is at %d", kill, newest, counter)
	}
	return landed
}

// checkUsage checks that the stored ledger is the one of the last check
// plus every acknowledged batch, plus the batch in flight whole or not at
// all. It then takes the stored ledger as the model, and returns the uses
// lost and whether the batch in flight landed.
func (m *crashModel) checkUsage(t *testing.T, kill int, st *Store, run *crashRun) (lost []crashtest.Use, landed bool) {
	t.Helper()
	rows, err := st.DB().QueryContext(t.Context(),
		`SELECT client, day, model, requests, prompt_tokens, completion_tokens FROM usage`)
	if err != nil {
		t.Fatalf("kill %d: reading the ledger: %v", kill, err)
	}
	defer rows.Close()
	stored := make(map[crashtest.Key]store.UsageRow)
	for rows.Next() {
		var r store.UsageRow
		if err := rows.Scan(&r.Client, &r.Day, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens); err != nil {
			t.Fatalf("kill %d: reading the ledger: %v", kill, err)
		}
		stored[crashtest.Key{Client: r.Client, Day: r.Day, Model: r.Model}] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("kill %d: reading the ledger: %v", kill, err)
	}

	landed = crashtest.CompareLedger(t, kill, m.usage, stored, run.flushed, run.batch)
	m.usage = stored

	if landed {
		return run.pending, true
	}
	return slices.Concat(run.batch, run.pending), false
}

// checkIntegrity runs SQLite's own check of the whole file.
func checkIntegrity(t *testing.T, kill int, st *Store) {
	t.Helper()
	rows, err := st.DB().QueryContext(t.Context(), "PRAGMA integrity_check")
	if err != nil {
		t.Fatalf("kill %d: integrity_check: %v", kill, err)
	}
	defer rows.Close()
	var problems []string
	for rows.Next() {
		var p string
		if err := rows.Scan(&p); err != nil {
			t.Fatalf("kill %d: integrity_check: %v", kill, err)
		}
		problems = append(problems, p)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("kill %d: integrity_check: %v", kill, err)
	}
	if len(problems) != 1 || problems[0] != "ok" {
		t.Errorf("kill %d: integrity_check = %q, want ok", kill, problems)
	}
}
