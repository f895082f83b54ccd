package keystore

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"maps"
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

	"go.uber.org/zap"
)

// crashStoreEnv holds the database path when the test binary runs as the
// store process of TestSQLiteCrashConsistency.
const crashStoreEnv = "VIGTHORIA_CRASH_STORE"

const (
	crashKills = 50

	// A store process is killed this long after its first write, at
	// random between the two.
	crashMinRun = 20 * time.Millisecond
	crashMaxRun = 200 * time.Millisecond

	// crashStartTimeout bounds the wait for a store process's first
	// write: a race-enabled binary starting on a busy machine.
	crashStartTimeout = 30 * time.Second

	// crashLedgerFlush is how often the store process flushes its
	// ledger: see runCrashStore.
	crashLedgerFlush = 20 * time.Millisecond
)

var (
	crashTiers   = []string{"free", "pro"}
	crashClients = []string{"key_crashAlice", "key_crashBob", "key_crashCarol", "key_crashDave"}
	crashModels  = []string{"vigthoria-fast-1", "vigthoria-pro-1"}
)

// TestSQLiteCrashConsistency kills a process writing keys and usage to a
// SQLite store, 50 times, on one database file. After every kill the
// store must open and pass SQLite's integrity check; every key change the
// process acknowledged, in this run or an earlier one, must be there; and
// the ledger must hold exactly the batches acknowledged as written (plus
// the one being written, whole or not at all), so that only uses added in
// memory since the last flush are lost, all within ledgerFlushInterval,
// the lag the ledger documents.
func TestSQLiteCrashConsistency(t *testing.T) {
	// Re-executed by runStoreProcess: be the store process.
	if path := os.Getenv(crashStoreEnv); path != "" {
		err := runCrashStore(path)
		fmt.Fprintln(os.Stderr, "store process:", err)
		os.Exit(2)
	}

	path := filepath.Join(t.TempDir(), "crash.db")
	m := crashModel{keys: make(map[string]Record), usage: make(map[ledgerKey]UsageRow)}
	var (
		begin                          = time.Now()
		acks, minAcks, maxAcks         = 0, math.MaxInt, 0
		minRun, maxRun                 = time.Duration(math.MaxInt64), time.Duration(0)
		keyCuts, batchCuts             cuts
		lostUses, lostTokens, lostRuns int
		oldestLoss                     time.Duration
	)
	for kill := 1; kill <= crashKills; kill++ {
		lines, killedAt, ran := runStoreProcess(t, path, crashMinRun+rand.N(crashMaxRun-crashMinRun))
		run := m.apply(t, kill, lines)

		st, err := OpenSQLite(path)
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
			age := killedAt.Sub(u.at)
			if age >= ledgerFlushInterval {
				t.Errorf("kill %d: a use of %s on %s (%d tokens) was lost %v after it was added, beyond the ledger's documented lag of %v",
					kill, u.row.Client, u.row.Model, u.row.TotalTokens(), age, ledgerFlushInterval)
			}
			oldestLoss = max(oldestLoss, age)
			lostTokens += int(u.row.TotalTokens())
		}
		lostUses += len(lost)
		if len(lost) > 0 {
			lostRuns++
		}
		keyCuts.add(run.inflight != nil, keyLanded)
		batchCuts.add(run.batch != nil, batchLanded)
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
	t.Logf("%d kills in %v", crashKills, time.Since(begin).Round(time.Millisecond))
	t.Logf("lines read per process: %d to %d, %d in all; killed %v to %v after the first write",
		minAcks, maxAcks, acks, minRun.Round(time.Millisecond), maxRun.Round(time.Millisecond))
	t.Logf("key changes cut by the kill: %v; %d keys at the end", keyCuts, len(m.keys))
	t.Logf("ledger batches cut by the kill: %v; %d rows hold %d requests, %d tokens",
		batchCuts, len(m.usage), requests, tokens)
	t.Logf("ledger loss: %d uses (%d tokens) in %d of %d kills, the oldest %v before its kill; documented window %v, flushed every %v here",
		lostUses, lostTokens, lostRuns, crashKills, oldestLoss.Round(time.Microsecond), ledgerFlushInterval, crashLedgerFlush)
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
	case <-time.After(crashStartTimeout):
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
		t.Fatalf("the store process wrote nothing in %v", crashStartTimeout)
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
	st, err := OpenSQLite(path)
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
	// here it runs every crashLedgerFlush, so that 50 kills take seconds
	// and most find usage both stored and pending. What a kill can lose,
	// the uses added since the last flush began, does not depend on the
	// period. One goroutine does everything, so that the order of the
	// lines is the order of the writes.
	ledger := newLedger(zap.NewNop())
	ledger.attach(ackedUsage{st})
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
			client, model := crashClients[rand.IntN(len(crashClients))], crashModels[rand.IntN(len(crashModels))]
			prompt, completion := 1+rand.Int64N(2000), rand.Int64N(1000)
			at := time.Now()
			ledger.Add(client, model, at, Tokens{Prompt: prompt, Completion: completion})
			ack("use %s %s %s %d %d %d", client, Day(at), model, prompt, completion, at.UnixNano())
		}
		if time.Since(flushed) >= crashLedgerFlush {
			if err := ledger.flush(ctx); err != nil {
				return err
			}
			flushed = time.Now()
		}
	}
}

func crashCreate(ctx context.Context, st Store, n int) (string, error) {
	name := fmt.Sprintf("crash-%d-%d", os.Getpid(), n)
	tier := crashTiers[rand.IntN(len(crashTiers))]
	now := storedTime(time.Now())
	var expires time.Time
	if rand.IntN(2) == 0 {
		expires = now.Add(720 * time.Hour)
	}
	ack("begin create %s %s %d %d", name, tier, millis(now), millis(expires))
	r, _, err := Create(ctx, st, Attrs{Name: name, Tier: tier, Expires: expires}, now)
	if err != nil {
		return "", err
	}
	ack("create %s %x", r.ID, r.Hash)
	return r.ID, nil
}

func crashRotate(ctx context.Context, st Store, id string) error {
	ack("begin rotate %s", id)
	secret, err := Rotate(ctx, st, id)
	if err != nil {
		return err
	}
	ack("rotate %s %x", id, HashSecret(secret))
	return nil
}

func crashRevoke(ctx context.Context, st Store, id string) error {
	at := storedTime(time.Now())
	ack("begin revoke %s %d", id, millis(at))
	if err := st.Revoke(ctx, id, at); err != nil {
		return err
	}
	ack("revoke %s", id)
	return nil
}

// ackedUsage is the store process's ledger store: it announces each batch
// with its totals before writing it, and acknowledges it once committed.
type ackedUsage struct{ *SQLite }

func (a ackedUsage) AddUsage(ctx context.Context, b UsageBatch) error {
	var requests, tokens int64
	for _, r := range b.Rows {
		requests += r.Requests
		tokens += r.TotalTokens()
	}
	ack("flushing %d %d", requests, tokens)
	if err := a.SQLite.AddUsage(ctx, b); err != nil {
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
	keys  map[string]Record
	usage map[ledgerKey]UsageRow
}

// crashRun is what one store process acknowledged.
type crashRun struct {
	keyAcks, uses, flushes int

	inflightOp string  // the key change announced and not acknowledged: "create", "rotate", "revoke" or ""
	inflight   *Record // the key as that change would leave it; for a rotation, the old hash

	flushed []crashUse // in acknowledged batches
	batch   []crashUse // in the batch announced and not acknowledged
	pending []crashUse // added, in no batch yet
}

type crashUse struct {
	row UsageRow
	at  time.Time
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
		hash := func(s string) Hash {
			var h Hash
			if b, err := hex.DecodeString(s); err != nil || len(b) != len(h) {
				bad()
			} else {
				copy(h[:], b)
			}
			return h
		}
		known := func(id string) Record {
			r, ok := m.keys[id]
			if !ok {
				t.Fatalf("kill %d: the store process changes key %s, which no process created", kill, id)
			}
			return r
		}
		// Each acknowledgement must follow the announcement of its change.
		finish := func(op, id string) *Record {
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
			run.inflight = &Record{Name: f[2], Tier: f[3], Created: fromMillis(num(f[4])), Expires: fromMillis(num(f[5]))}
		case len(f) == 3 && f[0] == "begin" && f[1] == "rotate":
			r := known(f[2])
			run.inflightOp, run.inflight = "rotate", &r
		case len(f) == 4 && f[0] == "begin" && f[1] == "revoke":
			r := known(f[2])
			r.Revoked = fromMillis(num(f[3]))
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
			run.pending = append(run.pending, crashUse{
				row: UsageRow{Client: f[1], Day: f[2], Model: f[3], Requests: 1, PromptTokens: num(f[4]), CompletionTokens: num(f[5])},
				at:  time.Unix(0, num(f[6])),
			})
		case len(f) == 3 && f[0] == "flushing":
			// The batch must be exactly the uses added since the last one.
			var requests, tokens int64
			for _, u := range run.pending {
				requests += u.row.Requests
				tokens += u.row.TotalTokens()
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
func (m *crashModel) checkKeys(t *testing.T, kill int, st *SQLite, run *crashRun) (landed bool) {
	t.Helper()
	recs, err := st.List(t.Context())
	if err != nil {
		t.Fatalf("kill %d: listing keys: %v", kill, err)
	}
	stored := make(map[string]Record, len(recs))
	for _, r := range recs {
		stored[r.ID] = r
	}
	landed, _ = checkAcknowledged(t, kill, stored, m.keys, run.inflightOp, run.inflight)
	m.keys = stored

	// A change and its sequence number are written in one transaction.
	var newest, counter int64
	err = st.db.QueryRowContext(t.Context(),
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
func (m *crashModel) checkUsage(t *testing.T, kill int, st *SQLite, run *crashRun) (lost []crashUse, landed bool) {
	t.Helper()
	rows, err := st.db.QueryContext(t.Context(),
		`SELECT client, day, model, requests, prompt_tokens, completion_tokens FROM usage`)
	if err != nil {
		t.Fatalf("kill %d: reading the ledger: %v", kill, err)
	}
	defer rows.Close()
	stored := make(map[ledgerKey]UsageRow)
	for rows.Next() {
		var r UsageRow
		if err := rows.Scan(&r.Client, &r.Day, &r.Model, &r.Requests, &r.PromptTokens, &r.CompletionTokens); err != nil {
			t.Fatalf("kill %d: reading the ledger: %v", kill, err)
		}
		stored[ledgerKey{r.Client, r.Day, r.Model}] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("kill %d: reading the ledger: %v", kill, err)
	}

	landed = compareLedger(t, kill, m.usage, stored, run.flushed, run.batch)
	m.usage = stored

	if landed {
		return run.pending, true
	}
	return slices.Concat(run.batch, run.pending), false
}

// withUses returns a copy of rows with uses added.
// compareLedger checks that the stored ledger is the model's plus every
// acknowledged batch, plus the batch in flight whole or not at all, and
// reports whether that batch landed.
func compareLedger(t *testing.T, kill int, model, stored map[ledgerKey]UsageRow, flushed, batch []crashUse) (landed bool) {
	t.Helper()
	acked := withUses(model, flushed)
	withBatch := withUses(acked, batch)
	landed = batch != nil && maps.Equal(stored, withBatch)
	if !maps.Equal(stored, acked) && !landed {
		t.Errorf("kill %d: the ledger differs from its acknowledged batches%s", kill, usageDiff(stored, acked))
		if batch != nil {
			t.Errorf("kill %d: and from those plus the batch in flight%s", kill, usageDiff(stored, withBatch))
		}
	}
	return landed
}

func withUses(rows map[ledgerKey]UsageRow, uses []crashUse) map[ledgerKey]UsageRow {
	sum := maps.Clone(rows)
	for _, u := range uses {
		k := ledgerKey{u.row.Client, u.row.Day, u.row.Model}
		r := sum[k]
		r.Client, r.Day, r.Model = k.client, k.day, k.model
		r.Requests += u.row.Requests
		r.PromptTokens += u.row.PromptTokens
		r.CompletionTokens += u.row.CompletionTokens
		sum[k] = r
	}
	return sum
}

// usageDiff lists the rows where got differs from want.
func usageDiff(got, want map[ledgerKey]UsageRow) string {
	var b strings.Builder
	both := maps.Clone(want)
	maps.Copy(both, got)
	for k := range both {
		if g, w := got[k], want[k]; g != w {
			fmt.Fprintf(&b, "\n\t%s %s %s: %d requests, %d+%d tokens; want %d, %d+%d",
				k.client, k.day, k.model, g.Requests, g.PromptTokens, g.CompletionTokens, w.Requests, w.PromptTokens, w.CompletionTokens)
		}
	}
	return b.String()
}

// checkIntegrity runs SQLite's own check of the whole file.
func checkIntegrity(t *testing.T, kill int, st *SQLite) {
	t.Helper()
	rows, err := st.db.QueryContext(t.Context(), "PRAGMA integrity_check")
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

// sameRecord reports whether two records are the same key in the same
// state.
func sameRecord(a, b Record) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Tier == b.Tier && a.Hash == b.Hash &&
		a.Created.Equal(b.Created) && a.Expires.Equal(b.Expires) &&
		a.Revoked.Equal(b.Revoked) && a.LastUsed.Equal(b.LastUsed)
}

// checkAcknowledged checks that stored holds every acknowledged key as
// acknowledged, and nothing else but what the change in flight (op on
// inflight, the key as that change would leave it) made, whole or not at
// all. It reports whether that change landed, and the ID of a key it
// created.
func checkAcknowledged(t *testing.T, kill int, stored, acked map[string]Record, op string, inflight *Record) (landed bool, created string) {
	t.Helper()
	for id, want := range acked {
		if _, ok := stored[id]; !ok {
			t.Errorf("kill %d: acknowledged key %s (%s, %s) is gone", kill, id, want.Name, want.Tier)
		}
	}
	for id, got := range stored {
		want, known := acked[id]
		switch {
		case known && inflight != nil && id == inflight.ID:
			// Cut by the kill: as acknowledged before it, or as after it.
			after := *inflight
			if op == "rotate" {
				after.Hash = got.Hash // the new secret was never shown
			}
			if !sameRecord(got, want) && !sameRecord(got, after) {
				t.Errorf("kill %d: key %s, cut in its %s, is %+v\nwant %+v\nor   %+v", kill, id, op, got, want, after)
			}
			landed = !sameRecord(got, want)
		case known:
			if !sameRecord(got, want) {
				t.Errorf("kill %d: key %s is %+v\nacknowledged as %+v", kill, id, got, want)
			}
		case op == "create" && created == "":
			after := *inflight
			after.ID, after.Hash = id, got.Hash // never acknowledged
			if !sameRecord(got, after) {
				t.Errorf("kill %d: key %s, created as the kill came, is %+v\nwant %+v", kill, id, got, after)
			}
			landed, created = true, id
		default:
			t.Errorf("kill %d: key %s (%s) is stored, but no change in flight made it", kill, id, got.Name)
		}
	}
	return landed, created
}

// cuts counts the changes a kill cut, by whether they landed whole or
// left no trace.
type cuts struct{ landed, lost int }

// add counts one run: whether a change was in flight, and if it landed.
func (c *cuts) add(inFlight, landed bool) {
	switch {
	case !inFlight:
	case landed:
		c.landed++
	default:
		c.lost++
	}
}

func (c cuts) String() string {
	return fmt.Sprintf("%d landed whole, %d left no trace", c.landed, c.lost)
}
