package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// What each feature costs: a ladder of module targets, each adding one
// feature to the one before, from the bare module to what an operator
// turns on, and variants of the bare rung (another caller, another
// store). They are measured under small chats only, in interleaved
// rounds beside plain Caddy, so that a feature's cost is the difference
// of two rungs of one run.

// Markers of the ladder's section in the report: `make bench` writes it
// after its load, -features-only rewrites it alone.
const (
	featuresBegin = "<!-- features -->"
	featuresEnd   = "<!-- /features -->"
)

// A rung is one target of the ladder and what it adds to the rung it is
// compared with.
type rung struct {
	target
	adds   string // the feature, Markdown
	before string // the rung it is compared with; empty for plain Caddy
	caller string // whose chats it is sent: benchTier, signedIn or minted
}

// bareRung is the module with nothing on: one tier with limits of
// requests and tokens, the default store, a client key.
const bareRung = "bare"

// ladder returns the rungs in the order they are measured: plain Caddy,
// the bare module, each feature added to the rung before up to the
// deployed features and the pool, then the bare rung's variants, and a
// budget on the Redis variant.
func ladder() []rung {
	const sqlite = "sqlite:{{.Dir}}/vigthoria.db"
	rungs := []rung{{target: target{name: caddyName, site: plainSite}, adds: "plain Caddy", caller: benchTier}}
	var f features
	climb := func(name, adds string, change func(*features)) {
		change(&f)
		rungs = append(rungs, rung{target: target{name: name, site: moduleSite, features: f, store: sqlite},
			adds: adds, before: rungs[len(rungs)-1].name, caller: benchTier})
	}
	climb(bareRung, "the module: one tier with limits of requests and tokens, SQLite, a client key", func(*features) {})
	climb("budget", "a budget in money, at `prices` of the chat's model", func(f *features) { f.Budget = true })
	climb("settings", "the key's own settings (requests, models) over its tier's", func(f *features) { f.Settings = true })
	climb("alerts", "`alerts` with a webhook, thresholds not reached", func(f *features) { f.Alerts = true })
	climb("dashboard", "`vigthoria_dashboard` on another site, behind `basic_auth`", func(f *features) { f.Dashboard = true })
	climb("queue", "`queue 10s`, unsaturated", func(f *features) { f.Queue = true })
	climb("pool", "a pool of three server keys and `upstream_limits`, not reached", func(f *features) { f.Pool = true })
	variant := func(name, adds, store, caller string, f features) {
		rungs = append(rungs, rung{target: target{name: name, site: moduleSite, features: f, store: store},
			adds: adds, before: bareRung, caller: caller})
	}
	variant("jwt", "the caller an OpenID provider's user (RS256 JWT) instead of a key", sqlite, signedIn, features{JWT: true})
	variant("minted", "the caller a token minted by a key instead of a key", sqlite, minted, features{Minting: true})
	variant("redis", "the Redis store instead of SQLite", "{{.Redis}}", benchTier, features{})
	variant("timeouts", "`header_timeout 10m` and `idle_timeout 5m`, not reached", sqlite, benchTier, features{Timeouts: true})
	// A budget is an account of its own, which Redis decided on every
	// request until budgets were sliced.
	rungs = append(rungs, rung{target: target{name: "redis-budget", site: moduleSite, features: features{Budget: true}, store: "{{.Redis}}"},
		adds: "a budget in money on the Redis store", before: "redis", caller: benchTier})
	return rungs
}

// featuresRun is what the ladder saw.
type featuresRun struct {
	began    time.Time
	elapsed  time.Duration
	machine  machine
	cfg      config
	rungs    []rung
	results  results
	webhooks int64 // POSTs the alerts receiver got
}

// runFeatures starts the upstream and every rung, measures small chats
// on each in interleaved rounds, and stops them all again.
func runFeatures(ctx context.Context, cfg config) (*featuresRun, error) {
	fr := &featuresRun{began: time.Now(), cfg: cfg, rungs: ladder(), results: make(results)}
	var err error
	if fr.machine, err = describeMachine(cfg.caddy); err != nil {
		return nil, err
	}
	dir, up, err := startUpstreamIn("vigthoria-features-", cfg.chunkDelay)
	if err != nil {
		return nil, err
	}
	defer up.closeAndRemove(dir)
	ts := make([]target, len(fr.rungs))
	for i, r := range fr.rungs {
		ts[i] = r.target
	}
	var redisURL string
	if needsRedis(ts) {
		redis, err := redistest.Run(dir)
		if err != nil {
			return nil, err
		}
		defer redis.Stop()
		redisURL = redis.URL
	}
	insts, err := startTargets(ctx, ts, cfg.caddy, dir, up, redisURL)
	if err != nil {
		return nil, err
	}
	defer stopAll(insts)

	measured := cfg
	measured.duration = cfg.featuresDuration
	fmt.Printf("features: %d rungs × %d rounds of %v (+%v warm-up): about %v\n", len(fr.rungs), cfg.rounds, measured.duration, cfg.warmup,
		time.Duration(len(fr.rungs)*cfg.rounds)*(measured.duration+cfg.warmup))
	for round := 1; round <= cfg.rounds; round++ {
		// Each round starts one rung further on, so that no rung is always
		// measured right after the same one while the machine drifts.
		for n := range fr.rungs {
			i := (n + round - 1) % len(fr.rungs)
			r := fr.rungs[i]
			w := workload{name: chatWorkload, run: load(cfg.conns, chatRequests(r.caller))}
			s, err := measure(ctx, measured, up, w, insts[i])
			if err != nil {
				return nil, fmt.Errorf("round %d, %s: %w", round, r.name, err)
			}
			k := resultKey{chatWorkload, r.name}
			fr.results[k] = append(fr.results[k], s)
			fmt.Printf("features: round %d/%d  %-10s %s  CPU %s\n", round, cfg.rounds, r.name, s.summary(false), fmtDur(s.cpuPerReq))
		}
	}
	fr.webhooks = up.hooks.posts.Load()
	fr.elapsed = time.Since(fr.began)
	return fr, nil
}

// featuresOnly runs the ladder alone and rewrites its section of cfg.out.
func featuresOnly(ctx context.Context, cfg config) error {
	if cfg.pin {
		if err := pin(); err != nil {
			fmt.Printf("features: the rungs run unpinned: %v\n", err)
		}
	}
	fr, err := runFeatures(ctx, cfg)
	if err != nil {
		return err
	}
	old, err := os.ReadFile(cfg.out)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	if err := os.WriteFile(cfg.out, withSection(old, fr.markdown(), featuresBegin, featuresEnd), 0o644); err != nil {
		return err
	}
	fmt.Printf("features: wrote its section of %s\n", cfg.out)
	return nil
}

// added is what rung r adds to the rung it is compared with, and the
// median of the rounds' ratios of their throughput. The CPU it adds is
// read against plain Caddy measured in the same round: the difference of
// the two rungs' medians of the rounds' ratios to plain Caddy's CPU, in
// µs of plain Caddy's median. The machine's drift between rounds (plain
// Caddy's own CPU per request moves by tens of percent on a shared
// machine) reaches a rung and plain Caddy of one round alike, and cancels
// out of the ratios, where it stays in a difference of raw medians. The
// ladder's figures still add up: to its top rung's ratio less one, in the
// same µs.
func (fr *featuresRun) added(r rung) (cpu, rate float64, ok bool) {
	plain, ok0 := fr.results.median(chatWorkload, caddyName, byCPU)
	mine, ok1 := fr.cpuRatio(r.name)
	theirs, ok2 := fr.cpuRatio(r.before)
	rate, ok3 := fr.results.ratio(chatWorkload, r.name, r.before, byRate)
	return (mine - theirs) * plain, rate, ok0 && ok1 && ok2 && ok3
}

// cpuRatio is the median of the rounds' ratios of rung name's CPU per
// request to plain Caddy's: 1 for plain Caddy itself.
func (fr *featuresRun) cpuRatio(name string) (float64, bool) {
	if name == caddyName {
		return 1, true
	}
	return fr.results.ratio(chatWorkload, name, caddyName, byCPU)
}

// markdown renders the ladder's section of the report, markers included.
func (fr *featuresRun) markdown() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\n## What each feature costs\n\n", featuresBegin)
	fmt.Fprintf(&b, "Run on %s in %v, %d cores, load average %s when it began; `make bench` writes this section after the load, "+
		"`go run ./bench -features-only` rewrites it alone. "+
		"A ladder of targets under small chats only (`%s`: not streamed, %d connections, each rung's caller), each adding one feature to the one before, "+
		"then variants of the bare rung, each compared with it, and a budget on the Redis variant; all beside plain Caddy, in %d interleaved rounds of %v after a %v warm-up, each round starting one rung further on "+
		"(shorter than the load's measurements above, to keep this run to a few minutes: `-features-duration`). "+
		"Added CPU is read against plain Caddy of the same round, so that the machine's drift between rounds cancels out: the difference of the two rungs' medians of the rounds' ratios to plain Caddy's CPU per request, in µs of plain Caddy's median, so that the ladder's add up to its top rung's ratio less one; "+
		"each ratio is the median of the rounds' ratios.\n\n",
		fr.began.UTC().Format("2006-01-02 15:04 MST"), fr.elapsed.Round(time.Second), fr.machine.cores, fr.machine.loadAverage,
		chatWorkload, fr.cfg.conns, fr.cfg.rounds, fr.cfg.featuresDuration, fr.cfg.warmup)
	fmt.Fprintf(&b, "| feature | rung | compared with | added CPU per request | req/s ÷ that rung | CPU per request | ÷ plain Caddy's | req/s | ÷ plain Caddy's | errors |\n")
	fmt.Fprintf(&b, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range fr.rungs {
		med := func(f figure) float64 { v, _ := fr.results.median(chatWorkload, r.name, f); return v }
		cells := []string{r.adds, "`" + r.name + "`", "—", "—", "—"}
		if r.before != "" {
			cpu, rate, ok := fr.added(r)
			cells[2] = "`" + r.before + "`"
			cells[3] = ifMeasured(ok, fmtSignedMicros(cpu))
			cells[4] = ifMeasured(ok, fmtRatio(rate))
		}
		cpuRatio, okCPU := fr.results.ratio(chatWorkload, r.name, caddyName, byCPU)
		rateRatio, okRate := fr.results.ratio(chatWorkload, r.name, caddyName, byRate)
		cells = append(cells,
			fmtDur(med(byCPU)),
			ifMeasured(okCPU && r.name != caddyName, fmtRatio(cpuRatio)),
			fmt.Sprintf("%.0f", med(byRate)),
			ifMeasured(okRate && r.name != caddyName, fmtRatio(rateRatio)),
			fmt.Sprintf("%.0f", fr.results.sum(chatWorkload, r.name, byErrors)))
		fmt.Fprintf(&b, "| %s |\n", strings.Join(cells, " | "))
	}
	lo, hi := spread(fr.results[resultKey{chatWorkload, caddyName}], byCPU)
	fmt.Fprintf(&b, "\nPlain Caddy's CPU per request went from %s to %s over the rounds: a difference between rungs within that spread is the machine's noise, not a feature's cost. "+
		"The alerts receiver got %d webhook POSTs (none expected: no threshold is reached).\n%s\n",
		fmtDur(lo), fmtDur(hi), fr.webhooks, featuresEnd)
	return b.Bytes()
}

// spread returns the smallest and largest f of the samples.
func spread(ss []sample, f figure) (lo, hi float64) {
	vs := make([]float64, len(ss))
	for i, s := range ss {
		vs[i] = f(s)
	}
	if len(vs) == 0 {
		return 0, 0
	}
	return slices.Min(vs), slices.Max(vs)
}

// fmtSignedMicros formats a difference of CPU time in nanoseconds as µs
// with one decimal and its sign: a feature's cost is often below 1 µs.
func fmtSignedMicros(ns float64) string {
	if ns >= 0 {
		return fmt.Sprintf("+%.1f µs", ns/1e3)
	}
	return fmt.Sprintf("−%.1f µs", -ns/1e3)
}
