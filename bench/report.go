package main

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

// report is everything BENCHMARKS.md says.
type report struct {
	cfg       config
	began     time.Time
	elapsed   time.Duration
	machine   machine
	workloads []workload
	results   results
	micro     string    // the micro-benchmarks' output
	microErr  error     // how go test failed, if it did
	profile   string    // the profileViews of the module's CPU profile
	compared  string    // plain Caddy's and the module's profiles per request, Markdown
	burst     *burstRun // the burst scenario; nil when not run
}

// A goal is one of the project's performance targets.
type goal struct {
	text  string
	check func(r *report) verdict
}

// verdict is how a run fared against a goal.
type verdict struct {
	measured bool
	figure   string
	met      bool
	note     string // why it is not met, when the run can tell
}

// goals are the project's targets, written at the top of the report.
var goals = []goal{
	{
		text: "With what an operator turns on, small chats at least 0.95× plain Caddy's throughput, at most 1.05× its CPU per request (`" + chatWorkload + "`)",
		check: func(r *report) verdict {
			mod, plain := resultKey{chatWorkload, moduleName}, resultKey{chatWorkload, caddyName}
			v := roundsVerdict(r.results.pairsOf(mod, plain, ratioOf, byRate), fmtRatio, func(x float64) bool { return x >= 0.95 })
			return r.withCPU(v, mod, plain, "plain Caddy's", 1.05)
		},
	},
	{
		text: "A signed-in user's small chats at least 0.95× a client key's, at most 1.05× its CPU per request, on the module (`" + signedInWorkload + "` against `" + chatWorkload + "`)",
		check: func(r *report) verdict {
			signed, key := resultKey{signedInWorkload, moduleName}, resultKey{chatWorkload, moduleName}
			v := roundsVerdict(r.results.pairsOf(signed, key, ratioOf, byRate), fmtRatio, func(x float64) bool { return x >= 0.95 })
			return r.withCPU(v, signed, key, "the key's", 1.05)
		},
	},
	{
		text: "A minted token's small chats at least 0.95× a client key's, at most 1.05× its CPU per request, on the module (`" + mintedWorkload + "` against `" + chatWorkload + "`)",
		check: func(r *report) verdict {
			tok, key := resultKey{mintedWorkload, moduleName}, resultKey{chatWorkload, moduleName}
			v := roundsVerdict(r.results.pairsOf(tok, key, ratioOf, byRate), fmtRatio, func(x float64) bool { return x >= 0.95 })
			return r.withCPU(v, tok, key, "the key's", 1.05)
		},
	},
	{
		text: "With the Redis store, small chats at least 0.9× plain Caddy's (`" + chatWorkload + "` on `" + redisName + "`)",
		check: func(r *report) verdict {
			fleet, plain := resultKey{chatWorkload, redisName}, resultKey{chatWorkload, caddyName}
			v := roundsVerdict(r.results.pairsOf(fleet, plain, ratioOf, byRate), fmtRatio, func(x float64) bool { return x >= 0.9 })
			return r.withCPU(v, fleet, plain, "plain Caddy's", 0)
		},
	},
	{
		text: "A pool of server keys and `upstream_limits` cost nothing measurable unsaturated: small chats at least 0.98× the module's without them (`" + chatWorkload + "` on `" + poolName + "`)",
		check: func(r *report) verdict {
			pooled, mod := resultKey{chatWorkload, poolName}, resultKey{chatWorkload, moduleName}
			v := roundsVerdict(r.results.pairsOf(pooled, mod, ratioOf, byRate), fmtRatio, func(x float64) bool { return x >= 0.98 })
			return r.withCPU(v, pooled, mod, "the module's", 0)
		},
	},
	{
		text: "Added p50 latency under 50 µs: module p50 − plain Caddy p50 (`" + latencyWorkload + "`)",
		check: func(r *report) verdict {
			return r.judge(latencyWorkload, caddyName, diffOf, byP50, fmtDiff, func(d float64) bool { return d < float64(50*time.Microsecond) })
		},
	},
	{
		text: "Streaming first-byte overhead under 1 ms: module − upstream time to the first event, p50 (`" + streamWorkload + "`)",
		check: func(r *report) verdict {
			v := r.judge(streamWorkload, upstreamName, diffOf, byP50, fmtDiff, func(d float64) bool { return d < float64(time.Millisecond) })
			if plain, ok := r.results.diff(streamWorkload, caddyName, upstreamName, byP50); ok {
				v.figure += "; plain Caddy " + fmtDiff(plain)
			}
			return v
		},
	},
	{
		text: "Cached `/v1/models` at least 1.5× plain Caddy's proxied `/v1/models` (`" + modelsWorkload + "`)",
		check: func(r *report) verdict {
			v := r.judge(modelsWorkload, caddyName, ratioOf, byRate, fmtRatio, func(x float64) bool { return x >= 1.5 })
			if calls, _ := r.results.median(modelsWorkload, moduleName, byUpCalls); !v.met && calls > 0.99 {
				v.note = "no cache yet (every request reached the upstream)"
			}
			return v
		},
	},
	{
		text: "Zero allocations in admit on the in-memory backend (`" + admitBenchmark + "`, admit and settle)",
		check: func(r *report) verdict {
			n, ok := allocsPerOp(r.micro, admitBenchmark)
			return verdict{measured: ok, figure: fmt.Sprintf("%g allocs/op", n), met: n == 0}
		},
	},
	{
		text: "Zero allocations to accept a token verified before (`" + rememberedBenchmark + "`)",
		check: func(r *report) verdict {
			n, ok := allocsPerOp(r.micro, rememberedBenchmark)
			return verdict{measured: ok, figure: fmt.Sprintf("%g allocs/op", n), met: n == 0}
		},
	},
}

// baselineGoal judges this build against the -baseline one: no more CPU
// per small chat (at most 1.03×, the rounds' noise), and the throughput
// of each round beside it.
var baselineGoal = goal{
	text: "No regression against the baseline build: CPU per request on small chats at most 1.03× `" + baselineName + "`'s (`" + chatWorkload + "`)",
	check: func(r *report) verdict {
		cpu, ok := r.results.ratio(chatWorkload, moduleName, baselineName, byCPU)
		v := roundsVerdict(r.results.pairs(chatWorkload, moduleName, baselineName, ratioOf, byRate), fmtRatio, func(float64) bool { return true })
		v.figure = "throughput " + v.figure + fmt.Sprintf("; CPU per request %s the baseline's", fmtRatio(cpu))
		v.measured, v.met = ok, cpu <= 1.03
		return v
	},
}

// judge compares the module with base under workload w, round by round,
// and checks the median of the rounds with met. The figure shows every
// round, so that a noisy run shows itself.
func (r *report) judge(w, base string, combine func(a, b float64) float64, f figure, format func(float64) string, met func(float64) bool) verdict {
	return roundsVerdict(r.results.pairs(w, moduleName, base, combine, f), format, met)
}

// withCPU adds to v the CPU per request of a against b's (whose, in
// words), each a median over the rounds, and their ratio, the median of
// the rounds' ratios; with most above 0, a ratio above most fails v. CPU
// time per request does not depend on what else the machine ran
// meanwhile, as throughput does: it shows the cost apart from the noise.
func (r *report) withCPU(v verdict, a, b resultKey, whose string, most float64) verdict {
	cpu, ok := median(r.results.pairsOf(a, b, ratioOf, byCPU))
	if !ok {
		return v
	}
	mine, _ := r.results.median(a.workload, a.target, byCPU)
	theirs, _ := r.results.median(b.workload, b.target, byCPU)
	v.figure += fmt.Sprintf("; CPU per request %s against %s %s, %s", fmtDur(mine), whose, fmtDur(theirs), fmtRatio(cpu))
	if most > 0 && v.measured && cpu > most {
		if v.met {
			v.note = fmt.Sprintf("CPU per request above %s", fmtRatio(most))
		} else {
			v.note = fmt.Sprintf("throughput, and CPU per request above %s", fmtRatio(most))
		}
		v.met = false
	}
	return v
}

// roundsVerdict checks the median of figures of the rounds with met.
func roundsVerdict(rounds []float64, format func(float64) string, met func(float64) bool) verdict {
	m, ok := median(slices.Clone(rounds))
	each := make([]string, len(rounds))
	for i, v := range rounds {
		each[i] = format(v)
	}
	return verdict{measured: ok, figure: format(m) + " (rounds: " + strings.Join(each, ", ") + ")", met: met(m)}
}

func (v verdict) String() string {
	switch {
	case !v.measured:
		return "not measured in this run"
	case v.met:
		return "met"
	case v.note != "":
		return "**not met**: " + v.note
	}
	return "**not met**"
}

// markdown renders the report.
func (r *report) markdown() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Benchmarks\n\n")
	fmt.Fprintf(&b, "Written by `make bench` (the harness in [bench/](bench/)) on %s, in %v. "+
		"Every figure below comes from that run; run it again to refresh this file.\n\n",
		r.began.UTC().Format("2006-01-02 15:04 MST"), r.elapsed.Round(time.Second))
	r.writeGoals(&b)
	r.writeSetup(&b)
	for _, w := range r.workloads {
		r.writeWorkload(&b, w)
	}
	r.writeMicro(&b)
	r.writeProfile(&b)
	r.writeMethod(&b)
	return b.Bytes()
}

func (r *report) writeGoals(w io.Writer) {
	fmt.Fprintf(w, "## Targets\n\n| target | this run | verdict |\n|---|---|---|\n")
	for _, g := range goals {
		v := g.check(r)
		figure := v.figure
		if !v.measured {
			figure = "—"
		}
		fmt.Fprintf(w, "| %s | %s | %s |\n", g.text, figure, v)
	}
	fmt.Fprintln(w)
}

func (r *report) writeSetup(w io.Writer) {
	m := r.machine
	fmt.Fprintf(w, "## Machine and setup\n\n")
	fmt.Fprintf(w, "- CPU: %s, %d cores; Linux %s; load average %s when the run began\n", m.cpu, m.cores, m.kernel, m.loadAverage)
	fmt.Fprintf(w, "- Go %s; Caddy %s (`./caddy`, built by `make build` with this module)\n", strings.TrimPrefix(m.goVersion, "go"), m.caddyVersion)
	fmt.Fprintf(w, "- %d rounds, each measuring every workload on every target in turn for %v after a %v warm-up\n",
		r.cfg.rounds, r.cfg.duration, r.cfg.warmup)
	if caddyCPU >= 0 {
		fmt.Fprintf(w, "- Each Caddy runs alone on CPU %d (taskset), the harness (load generator and upstream) on the others: the ratios compare what a request costs each target on one CPU, not how the scheduler shared the machine\n", caddyCPU)
	} else {
		fmt.Fprintf(w, "- The targets share the CPUs with the harness (not pinned)\n")
	}
	fmt.Fprintf(w, "\nTargets:\n\n")
	for _, t := range targets {
		fmt.Fprintf(w, "- `%s`: %s\n", t.name, t.about)
	}
	fmt.Fprintf(w, "\nTo reproduce: `make bench` (or, with `./caddy` built, `go run ./bench`; `go run ./bench -h` lists the settings).\n\n")
}

func (r *report) writeWorkload(w io.Writer, wl workload) {
	fmt.Fprintf(w, "## `%s`: %s\n\n", wl.name, wl.about)
	if wl.stream {
		fmt.Fprintf(w, "| target | streams/s | first event p50 | first event p99 | token gap p50 | token gap p99 | stream p50 | peak RSS | errors | first event p50 − upstream | − plain Caddy |\n")
		fmt.Fprintf(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	} else {
		fmt.Fprintf(w, "| target | req/s | p50 | p99 | CPU per request | peak RSS | errors | req/s ÷ upstream | req/s ÷ plain Caddy | p50 − plain Caddy |\n")
		fmt.Fprintf(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	}
	for _, t := range targets {
		if _, ok := r.results.median(wl.name, t.name, byRate); !ok {
			continue
		}
		cells := []string{"`" + t.name + "`"}
		if wl.stream {
			cells = append(cells, r.streamCells(wl.name, t.name)...)
		} else {
			cells = append(cells, r.loadCells(wl.name, t.name)...)
		}
		fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
	}
	fmt.Fprintln(w)
}

// loadCells are a row of a load workload's table, after the target.
func (r *report) loadCells(w, t string) []string {
	med := func(f figure) float64 { v, _ := r.results.median(w, t, f); return v }
	return []string{
		fmt.Sprintf("%.0f", med(byRate)),
		fmtDur(med(byP50)),
		fmtDur(med(byP99)),
		ifMeasured(med(byCPU) > 0, fmtDur(med(byCPU))),
		fmtBytes(int64(med(byPeakRSS))),
		fmt.Sprintf("%.0f", r.results.sum(w, t, byErrors)),
		r.versus(w, t, upstreamName, true, byRate),
		r.versus(w, t, caddyName, true, byRate),
		r.versus(w, t, caddyName, false, byP50),
	}
}

// streamCells are a row of a stream workload's table, after the target.
func (r *report) streamCells(w, t string) []string {
	med := func(f figure) float64 { v, _ := r.results.median(w, t, f); return v }
	return []string{
		fmt.Sprintf("%.1f", med(byRate)),
		fmtDur(med(byP50)),
		fmtDur(med(byP99)),
		fmtDur(med(byGap50)),
		fmtDur(med(byGap99)),
		fmtDur(med(byDur50)),
		fmtBytes(int64(med(byPeakRSS))),
		fmt.Sprintf("%.0f", r.results.sum(w, t, byErrors)),
		r.versus(w, t, upstreamName, false, byP50),
		r.versus(w, t, caddyName, false, byP50),
	}
}

// versus compares f of target t with the same of base, round by round:
// their ratio, or their difference as a duration.
func (r *report) versus(w, t, base string, ratio bool, f figure) string {
	if t == base {
		return "—"
	}
	if ratio {
		x, ok := r.results.ratio(w, t, base, f)
		return ifMeasured(ok, fmtRatio(x))
	}
	d, ok := r.results.diff(w, t, base, f)
	return ifMeasured(ok, fmtDiff(d))
}

func ifMeasured(ok bool, s string) string {
	if !ok {
		return "—"
	}
	return s
}

func (r *report) writeMicro(w io.Writer) {
	if r.micro == "" {
		return
	}
	fmt.Fprintf(w, "## Micro-benchmarks of the hot paths\n\n")
	fmt.Fprintf(w, "`%s` (`%s`, which builds a SQLite store of a million keys for about 30 s, is left out; run it with `go test -run '^$' -bench %s -benchtime 1x ./caller/keys/`):\n\n",
		strings.Join(microCommand("go"), " "), skippedBenchmark, skippedBenchmark)
	if r.microErr != nil {
		fmt.Fprintf(w, "**go test failed** (%v); what it printed:\n\n", r.microErr)
	}
	fmt.Fprintf(w, "```\n%s```\n\n", r.micro)
}

func (r *report) writeProfile(w io.Writer) {
	if r.profile == "" {
		return
	}
	fmt.Fprintf(w, "## Where the module's time goes\n\n")
	fmt.Fprintf(w, "A %v CPU profile of the `%s` Caddy under the `%s` workload, from its admin endpoint's `/debug/pprof/profile`: "+
		"first this module's functions, each with all it calls (Caddy's `reverse_proxy` is under `Forward`), then the busiest functions of the process.\n\n",
		r.cfg.profile, moduleName, profiledWorkload)
	fmt.Fprintf(w, "```\n%s```\n\n", r.profile)
	fmt.Fprintf(w, "### Per request, beside plain Caddy\n\n"+
		"Plain Caddy's profile was taken just before, the same way, so the machine's noise between the two windows is in the differences. Each profile is divided by the requests its Caddy answered meanwhile: "+
		"every figure is CPU time per request, a function's own and that of all it calls, so the rows overlap. "+
		"A function that takes less than 0.3 µs of a request is a sample or two, and moves from run to run.\n\n%s\n", r.compared)
}

func (r *report) writeMethod(w io.Writer) {
	fmt.Fprintf(w, `## How to read this

- Every target runs on loopback on the same %d cores as the load generator
  (the vegeta library, in the harness process) and the stand-in upstream
  (in the harness process too): absolute figures are lower than on a
  dedicated machine, and every target pays the same for it. The ratios are
  what carry over.
- Rounds are interleaved (each round measures every workload on every
  target in turn), so slow drift of the machine reaches all targets alike.
  Each figure is the median over the rounds; each ratio or difference is
  the median of the per-round ratios or differences. The targets table
  shows every round: where they disagree widely, something else was busy
  on the machine (see the load average above), and a new run will tell.
  On a shared machine, single rounds of two identical plain Caddys have
  differed by 17%%, so a median within a few percent of a goal can fall on
  either side of it from one run to the next.
- Load workloads run at a fixed concurrency: each connection sends its next
  request when the last one is answered. Latency is that of whole requests,
  body read; at saturation it follows throughput (p50 ≈ connections ÷
  req/s), which is why the added latency is read from the one-connection
  workload.
- Streams: the first event is the time from sending the request to the
  first server-sent event; the token gap is the time between consecutive
  content events as the client reads them, against the upstream's own
  %v. The module asks the upstream for the stream's usage and strips that
  chunk, so its streams end one upstream delay later.
- Peak RSS is the Caddy process's VmHWM, restarted before each measurement
  (/proc/PID/clear_refs), so it is the peak of that measurement; n/a for
  the upstream, which shares its process with the load generator.
`, r.machine.cores, r.cfg.chunkDelay)
}

// machine describes where the run happened.
type machine struct {
	cpu          string
	cores        int
	kernel       string
	loadAverage  string // of the last minute, before the run: others' work
	goVersion    string
	caddyVersion string
}

func describeMachine(caddyBin string) (machine, error) {
	m := machine{cpu: "unknown CPU", cores: runtime.NumCPU(), goVersion: runtime.Version()}
	out, err := exec.Command(caddyBin, "version").Output()
	if err != nil {
		return m, fmt.Errorf("%s version: %w (make build builds it)", caddyBin, err)
	}
	m.caddyVersion = strings.Fields(string(out) + " unknown")[0]
	if info, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(info)) {
			if name, ok := strings.CutPrefix(line, "model name"); ok {
				m.cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":"))
				break
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease") // empty if unknown
	m.kernel = strings.TrimSpace(string(kernel))
	load, _ := os.ReadFile("/proc/loadavg")
	m.loadAverage = strings.Fields(string(load) + " unknown")[0]
	return m, nil
}

// fmtDur formats nanoseconds as µs below a millisecond, else as ms with
// three significant digits.
func fmtDur(ns float64) string {
	switch abs := math.Abs(ns); {
	case abs < 1e6:
		return fmt.Sprintf("%.0f µs", ns/1e3)
	case abs < 10e6:
		return fmt.Sprintf("%.2f ms", ns/1e6)
	case abs < 100e6:
		return fmt.Sprintf("%.1f ms", ns/1e6)
	}
	return fmt.Sprintf("%.0f ms", ns/1e6)
}

// fmtDiff formats a difference of durations, with its sign.
func fmtDiff(ns float64) string {
	if ns >= 0 {
		return "+" + fmtDur(ns)
	}
	return "−" + fmtDur(-ns)
}

func fmtRatio(x float64) string { return fmt.Sprintf("%.2f×", x) }

// fmtBytes formats a size in MiB; 0 is not known.
func fmtBytes(n int64) string {
	if n == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

// scenarioStart begins a scenario run on processes of its own: the
// machine it runs on, and a temporary directory (named by prefix) for its
// processes, which the caller removes.
func scenarioStart(cfg config, prefix string) (machine, string, error) {
	m, err := describeMachine(cfg.caddy)
	if err != nil {
		return machine{}, "", err
	}
	dir, err := os.MkdirTemp("", prefix)
	return m, dir, err
}

// placement says where a scenario's processes ran: caddys (who they are)
// on a CPU of their own when pinned.
func placement(caddys string, pinned bool) string {
	if pinned {
		return fmt.Sprintf("%s on CPU %d, the harness and redis-server on the others", caddys, caddyCPU)
	}
	return caddys + ", the harness and redis-server unpinned, sharing the cores"
}
