package main

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// The burst scenario: one caller's burst on a fleet. Two instances of the
// module share one redis-server; a caller of a tier with a requests limit
// fires burstParallel requests at once, half to each instance, while
// callers of another tier send a steady light load to both. The fleet
// must admit exactly the limit, the upstream must receive exactly what
// was admitted, and the burst must not slow the other callers down: their
// p99 while it runs within 2× of their p99 without it.
const (
	// burstLimit is the burst tier's requests an hour: one more every
	// 36 s, so that none refills while a burst runs, and the fleet must
	// admit exactly burstLimit of it.
	burstLimit    = 100
	burstParallel = 200
	// burstRepeats is how many bursts are fired, each by a fresh caller.
	burstRepeats = 5
	// steadyCallers each send steadyRate small chats a second, in turn
	// to each instance, for the whole scenario.
	steadyCallers = 20
	steadyRate    = 10
	// burstWarmup of the steady load is not counted; burstUnloaded after
	// it is the steady callers' reference, without bursts.
	burstWarmup   = time.Second
	burstUnloaded = 5 * time.Second
	// burstEvery is the time from one burst to the next.
	burstEvery = 2500 * time.Millisecond
	// burstModel is the model the burst asks for, and the steady callers
	// do not, so that the upstream's requests of the burst can be told
	// from theirs.
	burstModel = "vigthoria-pro-1"
	// burstP99Factor is how much the steady callers' p99 may grow while
	// a burst runs.
	burstP99Factor = 2
)

// Markers of the burst scenario's section in the report.
const (
	burstBegin = "<!-- burst -->"
	burstEnd   = "<!-- /burst -->"
)

var burstBody = []byte(`{"model":"` + burstModel + `","max_tokens":16,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}`)

// burstSite is the module with the burst tier and the steady one, whose
// limits the load never reaches and whose every request Redis decides
// (a concurrency limit keeps it from slices).
var burstSite = fmt.Sprintf(`
http://127.0.0.1:{{.Port}} {
	bind 127.0.0.1
	vigthoria {
		upstream {{.Upstream}}/v1
{{.Keys}}
		store {{.Store}}
		tier burst {
			requests %d/1h
		}
		tier steady {
			requests 600000/1m
			concurrent 1000
		}
	}
}
`, burstLimit)

// burstKeys names the client keys of the scenario: a fresh burst caller
// for each burst, and the steady callers.
func burstKeys(f func(tier string, i int) error) error {
	for i := range burstRepeats {
		if err := f("burst", i); err != nil {
			return err
		}
	}
	for i := range steadyCallers {
		if err := f("steady", i); err != nil {
			return err
		}
	}
	return nil
}

// burstShot is what one burst saw.
type burstShot struct {
	answers  map[int]int    // by status
	refused  map[string]int // the 429s by code
	upstream int            // requests of the burst the upstream received
	// from and to are when the burst's first request was sent and its
	// last answer read, from the steady load's start.
	from, to time.Duration
	steady   []time.Duration // latencies of the steady requests sent meanwhile
}

func (b *burstShot) admitted() int { return b.answers[http.StatusOK] }

// exact reports whether the burst admitted exactly the limit, refused the
// rest with 429, and the upstream received exactly what was admitted.
func (b *burstShot) exact() bool {
	return b.admitted() == burstLimit && b.answers[http.StatusTooManyRequests] == burstParallel-burstLimit && b.upstream == b.admitted()
}

// burstRun is what the burst scenario saw.
type burstRun struct {
	began      time.Time
	machine    machine
	pinned     bool
	burstLoads // on the module's fleet, which the goal judges
	// floors are the same loads sent to burstFloors, in their order: what
	// the machine and the harness show without the module.
	floors []*burstLoads
}

// burstLoads is what one arrangement saw under the scenario's loads.
type burstLoads struct {
	unloaded []time.Duration // latencies of the steady requests before the bursts
	shots    []*burstShot
	// steadyFailed counts the steady requests not answered 200, by
	// status and code.
	steadyFailed map[string]int
}

// A burstFloor is an arrangement without the module that the scenario's
// loads are sent to as well, to read the module's figures against: a
// burst slows the other callers down on this machine whatever serves
// them, since the harness that sends the loads and the stand-in that
// answers them share its cores.
type burstFloor struct {
	about string // for the report, Markdown
	// site is the Caddyfile site of its two instances; empty: the loads
	// go straight to the stand-in upstream.
	site string
}

var burstFloors = []burstFloor{
	{about: "straight to the stand-in upstream, without a proxy"},
	{about: "through two plain Caddys (`reverse_proxy`, no limits: the whole burst goes upstream)", site: plainSite},
}

// loaded returns the latencies of the steady requests sent during every
// burst.
func (r *burstLoads) loaded() []time.Duration {
	var all []time.Duration
	for _, b := range r.shots {
		all = append(all, b.steady...)
	}
	return all
}

// allExact counts the bursts that were exact.
func (r *burstLoads) allExact() int {
	n := 0
	for _, b := range r.shots {
		if b.exact() {
			n++
		}
	}
	return n
}

// p99Ratio returns the steady callers' p99 during the bursts and without
// them, and their ratio.
func (r *burstLoads) p99Ratio() (loaded, unloaded time.Duration, ratio float64) {
	loaded, unloaded = quantile(r.loaded(), 0.99), quantile(slices.Clone(r.unloaded), 0.99)
	if unloaded > 0 {
		ratio = float64(loaded) / float64(unloaded)
	}
	return loaded, unloaded, ratio
}

// verdict judges the scenario: every burst exact, and the steady
// callers' p99 within burstP99Factor. The floors' ratios are told beside
// it, not judged.
func (r *burstRun) verdict() verdict {
	if r == nil || len(r.shots) == 0 {
		return verdict{}
	}
	loaded, unloaded, ratio := r.p99Ratio()
	v := verdict{measured: true,
		figure: fmt.Sprintf("%d of %d bursts admitted exactly %d, the upstream receiving exactly those; others' p99 %s during the bursts against %s without, %s%s",
			r.allExact(), len(r.shots), burstLimit, fmtDur(float64(loaded)), fmtDur(float64(unloaded)), fmtRatio(ratio), r.floorsText()),
		met: r.allExact() == len(r.shots) && ratio > 0 && ratio <= burstP99Factor,
	}
	switch {
	case r.allExact() < len(r.shots):
		v.note = "a burst was not admitted exactly"
	case !v.met:
		v.note = fmt.Sprintf("others' p99 above %d×", burstP99Factor)
	}
	return v
}

// floorsText tells the floors' ratios, for the verdict's figure; empty
// when none was measured.
func (r *burstRun) floorsText() string {
	var parts []string
	for i, f := range r.floors {
		if _, _, ratio := f.p99Ratio(); ratio > 0 {
			parts = append(parts, fmt.Sprintf("%s %s", fmtRatio(ratio), burstFloors[i].about))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return "; the same loads: " + strings.Join(parts, ", ")
}

// burstGoal is the scenario's row in the report's targets.
var burstGoal = goal{
	text: fmt.Sprintf("One caller's burst on a fleet: %d requests at once to two instances sharing Redis admit exactly its limit (%d), and other callers' p99 meanwhile stays within %d× of theirs without it (the burst section)",
		burstParallel, burstLimit, burstP99Factor),
	check: func(r *report) verdict { return r.burst.verdict() },
}

// runBurst runs the burst scenario on processes of its own: on the
// module's fleet, then on each of burstFloors.
func runBurst(ctx context.Context, cfg config) (*burstRun, error) {
	run := &burstRun{began: time.Now(), pinned: caddyCPU >= 0}
	m, dir, err := scenarioStart(cfg, "vigthoria-burst-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	run.machine = m
	redis, err := redistest.Run(dir)
	if err != nil {
		return nil, err
	}
	defer redis.Stop()
	loads, err := burstOn(ctx, cfg, filepath.Join(dir, "module"), burstSite, redis.URL)
	if err != nil {
		return nil, err
	}
	run.burstLoads = *loads
	loaded, unloaded, ratio := run.p99Ratio()
	fmt.Printf("burst: others' p99 %v during the bursts, %v without: %.2f×\n", loaded, unloaded, ratio)
	for i, f := range burstFloors {
		fmt.Printf("burst: the same loads %s\n", f.about)
		loads, err := burstOn(ctx, cfg, filepath.Join(dir, fmt.Sprintf("floor-%d", i)), f.site, "")
		if err != nil {
			return nil, err
		}
		run.floors = append(run.floors, loads)
		loaded, unloaded, ratio := loads.p99Ratio()
		fmt.Printf("burst: others' p99 %v during the bursts, %v without: %.2f×\n", loaded, unloaded, ratio)
	}
	return run, nil
}

// burstOn sends the scenario's loads to two instances of site, sharing
// the Redis at redisURL when it is set, in front of a stand-in of their
// own; or, site empty, straight to the stand-in, with its key.
func burstOn(ctx context.Context, cfg config, dir, site, redisURL string) (*burstLoads, error) {
	up, err := startLimitedUpstream(0, true)
	if err != nil {
		return nil, err
	}
	defer up.close()
	var urls []string
	var steadyKeys, burstKeyList []string
	if site == "" {
		urls = []string{up.url, up.url}
		steadyKeys, burstKeyList = slices.Repeat([]string{up.key}, steadyCallers), slices.Repeat([]string{up.key}, burstRepeats)
	} else {
		insts, err := startSites(ctx, cfg.caddy, dir, up, site, burstKeys, "steady", scarceData{Keys: oneKey}, 2, redisURL)
		defer stopAll(insts)
		if err != nil {
			return nil, err
		}
		urls = []string{insts[0].url, insts[1].url}
		steadyKeys, burstKeyList = insts[0].keys["steady"], insts[0].keys["burst"]
	}
	var steady []loadCaller
	for _, key := range steadyKeys {
		steady = append(steady, loadCaller{tier: "steady", key: key, rate: steadyRate})
	}
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 1024, DisableCompression: true}}
	defer client.CloseIdleConnections()

	// The bursts start half a second into their slots, the last one
	// having the rest of the steady load's time to end.
	firstBurst := burstWarmup + burstUnloaded + burstEvery/5
	loadEnd := burstWarmup + burstUnloaded + burstRepeats*burstEvery
	fmt.Printf("burst: %d steady callers at %d/s each for %v; %d bursts of %d from %v\n",
		steadyCallers, steadyRate, loadEnd, burstRepeats, burstParallel, firstBurst)
	loads := &burstLoads{steadyFailed: map[string]int{}}
	start := time.Now()
	var outs []outcome
	var load sync.WaitGroup
	load.Go(func() { outs = openLoop(ctx, client, urls, steady, loadEnd) })
	for i, key := range burstKeyList {
		if !sleepUntil(ctx, start.Add(firstBurst+time.Duration(i)*burstEvery)) {
			break
		}
		b := fire(ctx, urls, key, up, start)
		loads.shots = append(loads.shots, b)
		fmt.Printf("burst %d: %s, upstream received %d, %v\n", i+1, statusText(b.answers), b.upstream, (b.to - b.from).Round(time.Millisecond))
	}
	load.Wait()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	for _, o := range outs {
		if o.status != http.StatusOK {
			loads.steadyFailed[fmt.Sprintf("%d %s", o.status, o.code)]++
			continue
		}
		if o.sent >= burstWarmup && o.sent < burstWarmup+burstUnloaded {
			loads.unloaded = append(loads.unloaded, o.took)
		}
		for _, b := range loads.shots {
			if o.sent >= b.from && o.sent <= b.to {
				b.steady = append(b.steady, o.took)
			}
		}
	}
	return loads, nil
}

// fire sends burstParallel requests of the caller key at once, in turn to
// each of urls, and says what they got and what the upstream received.
// start is the steady load's, which the burst's times count from.
func fire(ctx context.Context, urls []string, key string, up *limitedUpstream, start time.Time) *burstShot {
	before := up.countModel(burstModel)
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: burstParallel, DisableCompression: true}}
	defer client.CloseIdleConnections()
	outs := make([]outcome, burstParallel)
	gate := make(chan struct{})
	var wg sync.WaitGroup
	for i := range burstParallel {
		wg.Go(func() {
			<-gate
			outs[i] = sendBody(ctx, client, urls[i%len(urls)], key, burstBody)
		})
	}
	b := &burstShot{answers: map[int]int{}, refused: map[string]int{}, from: time.Since(start)}
	close(gate)
	wg.Wait()
	b.to = time.Since(start)
	for _, o := range outs {
		b.answers[o.status]++
		if o.status == http.StatusTooManyRequests {
			b.refused[o.code]++
		}
	}
	b.upstream = up.countModel(burstModel) - before
	return b
}

// countModel counts the requests the upstream received that name model.
func (up *limitedUpstream) countModel(model string) int {
	n := 0
	for _, r := range up.Requests() {
		if bytes.Contains(r.Body, []byte(`"`+model+`"`)) {
			n++
		}
	}
	return n
}

// burstOnly runs the burst scenario alone and rewrites its section of
// cfg.out.
func burstOnly(ctx context.Context, cfg config) error {
	run, err := runBurst(ctx, cfg)
	if err != nil {
		return err
	}
	if err := rewriteSection(cfg.out, run.markdown(), burstBegin, burstEnd); err != nil {
		return err
	}
	fmt.Printf("burst: wrote its section of %s\n", cfg.out)
	return nil
}

// rewriteSection replaces the section between begin and end of the
// report at path, or appends it.
func rewriteSection(path string, section []byte, begin, end string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	return os.WriteFile(path, withSection(old, section, begin, end), 0o644)
}

// markdown renders the scenario's section of the report, markers
// included.
func (r *burstRun) markdown() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\n## One caller's burst on a fleet\n\n", burstBegin)
	where := placement("both Caddys", r.pinned)
	fmt.Fprintf(&b, "Run on %s, %d cores, load average %s when it began; %s. "+
		"Two instances of the module share one redis-server, in front of a stand-in upstream. "+
		"Tier `burst` has `requests %d/1h` (one more request every %v: none refills during a burst, so the fleet must admit exactly %d); "+
		"tier `steady` has `requests 600000/1m` and `concurrent 1000` (limits the load never reaches; Redis decides every request). "+
		"%d `steady` callers send %d small chats a second each, in turn to each instance, for the whole run (open loop); "+
		"their first %v is not counted, the next %v are their reference without bursts. "+
		"Then %d times, %v apart, a fresh `burst` caller sends %d small chats at once, half to each instance. "+
		"The upstream counts the requests that name the burst's model, which the steady callers do not ask for.\n\n",
		r.began.UTC().Format("2006-01-02 15:04 MST"), r.machine.cores, r.machine.loadAverage, where,
		burstLimit, time.Hour/burstLimit, burstLimit,
		steadyCallers, steadyRate, burstWarmup, burstUnloaded, burstRepeats, burstEvery, burstParallel)
	fmt.Fprintf(&b, "| burst | admitted (goal %d) | refused | other answers | upstream received (goal: as admitted) | burst lasted | steady requests sent meanwhile | their p99 / slowest |\n|---|--:|---|--:|--:|--:|--:|--:|\n", burstLimit)
	for i, s := range r.shots {
		other := burstParallel - s.admitted() - s.answers[http.StatusTooManyRequests]
		slowest := time.Duration(0)
		if len(s.steady) > 0 {
			slowest = slices.Max(s.steady)
		}
		fmt.Fprintf(&b, "| %d | %d %s | %d × 429 (%s) | %d | %d %s | %s | %d | %s / %s |\n",
			i+1, s.admitted(), mark(s.admitted() == burstLimit), s.answers[http.StatusTooManyRequests], refusedText(s.refused), other,
			s.upstream, mark(s.upstream == s.admitted()), fmtDur(float64(s.to-s.from)), len(s.steady),
			fmtDur(float64(quantile(s.steady, 0.99))), fmtDur(float64(slowest)))
	}
	loaded, unloaded, ratio := r.p99Ratio()
	fmt.Fprintf(&b, "\n| figure | this run | goal |\n|---|---|---|\n")
	fmt.Fprintf(&b, "| bursts admitted exactly %d, the rest refused 429, the upstream receiving exactly what was admitted | %d of %d | all %s |\n",
		burstLimit, r.allExact(), len(r.shots), mark(r.allExact() == len(r.shots)))
	fmt.Fprintf(&b, "| steady callers' p99 during the bursts (%d requests) against without (%d requests) | %s against %s: %s | at most %d× %s |\n",
		len(r.loaded()), len(r.unloaded), fmtDur(float64(loaded)), fmtDur(float64(unloaded)), fmtRatio(ratio), burstP99Factor, mark(ratio > 0 && ratio <= burstP99Factor))
	failed := 0
	for _, n := range r.steadyFailed {
		failed += n
	}
	fmt.Fprintf(&b, "| steady requests not answered 200, over the whole run | %s | none %s |\n",
		strings.TrimSpace(fmt.Sprintf("%d %s", failed, failedText(r.steadyFailed))), mark(failed == 0))
	if len(r.floors) > 0 {
		fmt.Fprintf(&b, "\nThe same loads without the module, after it, each on a stand-in of its own: how much a burst slows the steady callers down on this machine whatever serves them.\n\n")
		fmt.Fprintf(&b, "| sent | bursts' answers | steady requests sent during the bursts | their p99 during the bursts / without | ratio | steady requests not answered 200 |\n|---|---|--:|--:|--:|--:|\n")
		rows := append([]*burstLoads{&r.burstLoads}, r.floors...)
		for i, l := range rows {
			about := "to the module's fleet (above)"
			if i > 0 {
				about = burstFloors[i-1].about
			}
			answers := map[int]int{}
			for _, s := range l.shots {
				for status, n := range s.answers {
					answers[status] += n
				}
			}
			failed := 0
			for _, n := range l.steadyFailed {
				failed += n
			}
			loaded, unloaded, ratio := l.p99Ratio()
			fmt.Fprintf(&b, "| %s | %s | %d | %s / %s | %s | %d |\n", about, statusText(answers), len(l.loaded()),
				fmtDur(float64(loaded)), fmtDur(float64(unloaded)), fmtRatio(ratio), failed)
		}
	}
	fmt.Fprintf(&b, "\nA steady request counts as sent during a burst when it was sent between the burst's first request and its last answer; "+
		"its latency is from sending to its body read. Latencies on loopback include the harness, which sends both loads, "+
		"and the two Caddys sharing this machine's %d cores.\n%s\n", r.machine.cores, burstEnd)
	return b.Bytes()
}

// failedText lists the failed answers by status and code, in
// parentheses; empty for none.
func failedText(m map[string]int) string {
	var parts []string
	for _, what := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%d × %s", m[what], what))
	}
	if len(parts) == 0 {
		return ""
	}
	return "(" + strings.Join(parts, ", ") + ")"
}
