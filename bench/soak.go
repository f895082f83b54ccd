package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"
)

// The soak test: the module's Caddy under a long mixed load of paced
// small chats and many streams at once, at half the throughput it was
// measured to reach, checked for unexpected errors, for memory growth and
// for goroutines and open files left behind.
const (
	// soakSettle is when RSS growth starts to count: the first seconds
	// fill pools, caches and the heap's steady size.
	soakSettle = 10 * time.Second
	// soakMaxGrowth is the RSS growth from soakSettle to the end that
	// the soak allows.
	soakMaxGrowth = 0.10
	// soakProbe measures the maximum; longer than the benchmark's
	// measurements, because one figure sets the whole soak's rate.
	soakProbe = 5 * time.Second
	// Goroutines and open files may end this far above the baseline:
	// the admin request that counts them, and a pool grown by a
	// connection (the SQLite store's files) are not leaks.
	goroutineSlack = 5
	fdSlack        = 2
	// soakDrain is how long the proxy gets, after the load, to come back
	// to its baseline.
	soakDrain = 10 * time.Second
	// keptErrors is how many error messages the report quotes.
	keptErrors = 5
)

// Markers of the soak's section in the report: `make soak` replaces only
// what is between them, `make bench` keeps it.
const (
	soakBegin = "<!-- soak -->"
	soakEnd   = "<!-- /soak -->"
)

// soakRun is what the soak saw.
type soakRun struct {
	cfg     config
	began   time.Time
	machine machine
	maxRate float64 // small chats a second at cfg.conns connections, before the soak
	rate    int     // the paced chats a second: half maxRate
	plain   sample  // the paced chats
	streams sample  // the streams
	errs    errorLog
	// The proxy's figures: before the load, the highest of each under
	// load (goroutines and open files), after.
	base, peak, after procFigures
	rss               []int64 // VmRSS at the end of each second of the load
	peakRSS           int64   // VmHWM over the load
	// The live heap after a garbage collection, before and after the
	// load: what the program holds, apart from what the Go runtime keeps
	// of the RSS for later.
	baseHeap, afterHeap int64
}

// procFigures are a Caddy process's counts at one moment.
type procFigures struct {
	goroutines int
	fds        int
	rss        int64 // bytes
}

// soak runs the soak test on the module target and writes its section of
// cfg.out. It fails when a check is not met, after writing the report.
func soak(ctx context.Context, cfg config) error {
	s := &soakRun{cfg: cfg, began: time.Now()}
	var err error
	if s.machine, err = describeMachine(cfg.caddy); err != nil {
		return err
	}
	dir, up, err := startUpstreamIn("vigthoria-soak-", cfg.soakChunkDelay)
	if err != nil {
		return err
	}
	defer up.closeAndRemove(dir)

	t := targets[slices.IndexFunc(targets, func(t target) bool { return t.name == moduleName })]
	inst, err := start(ctx, t, cfg.caddy, dir, up, "")
	if err != nil {
		return fmt.Errorf("starting target %s: %w", t.name, err)
	}
	defer inst.caddy.stop()

	if err := s.probe(ctx, up, inst); err != nil {
		return fmt.Errorf("measuring the maximum: %w", err)
	}
	fmt.Printf("soak: maximum %.0f small chats/s at %d connections; %d/s paced and %d streams for %v\n",
		s.maxRate, cfg.conns, s.rate, cfg.soakStreams, cfg.soakDuration)
	adm := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	closeIdle(inst, up.srv)
	time.Sleep(time.Second) // for the connections' goroutines to end
	if s.base, err = inst.caddy.figures(ctx, adm); err != nil {
		return err
	}
	if s.baseHeap, err = liveHeap(ctx, adm, inst.caddy.adminURL); err != nil {
		return err
	}
	fmt.Printf("soak: baseline %s, live heap %s\n", s.base, fmtBytes(s.baseHeap))

	if err := s.load(ctx, inst, adm); err != nil {
		return err
	}
	if s.after, err = drain(ctx, inst, func() { closeIdle(inst, up.srv) }, adm, s.base); err != nil {
		return err
	}
	if s.afterHeap, err = liveHeap(ctx, adm, inst.caddy.adminURL); err != nil {
		return err
	}
	fmt.Printf("soak: after the load %s, live heap %s\n", s.after, fmtBytes(s.afterHeap))
	if s.behind() {
		fmt.Printf("soak: the chats fell behind their pace: %.0f/s of %d/s\n", s.plain.rate, s.rate)
	}

	section := s.markdown()
	old, err := os.ReadFile(cfg.out)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.WriteFile(cfg.out, withSection(old, section, soakBegin, soakEnd), 0o644); err != nil {
		return err
	}
	fmt.Printf("soak: wrote its section of %s\n", cfg.out)
	var failed []string
	for _, c := range s.checks() {
		fmt.Printf("soak: %s: %s (%s)\n", c.text, c.v, c.v.figure)
		if !c.v.met {
			failed = append(failed, c.text)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("soak: not met: %s", strings.Join(failed, "; "))
	}
	return nil
}

// probe measures the module's maximum on the benchmark's chat workload
// and sets the soak's rate to half of it.
func (s *soakRun) probe(ctx context.Context, up *upstream, inst *instance) error {
	wls := workloads(s.cfg)
	w := wls[slices.IndexFunc(wls, func(w workload) bool { return w.name == chatWorkload })]
	probe := s.cfg
	probe.duration = soakProbe
	m, err := measure(ctx, probe, up, w, inst)
	if err != nil {
		return err
	}
	if m.errors > 0 {
		return fmt.Errorf("%d errors, the first: %s", m.errors, m.firstErr)
	}
	s.maxRate = m.rate
	s.rate = max(1, int(m.rate/2))
	return nil
}

// load runs the mixed load for cfg.soakDuration, sampling the proxy every
// second, and waits for every request and stream to end.
func (s *soakRun) load(ctx context.Context, inst *instance, adm *http.Client) error {
	if err := inst.caddy.resetPeakRSS(); err != nil {
		return fmt.Errorf("resetting the peak RSS: %w", err)
	}
	begin := time.Now()
	s.errs.began = begin
	var wg sync.WaitGroup
	wg.Go(func() { s.plain = pacedChats(ctx, inst, s.cfg.conns, s.rate, s.cfg.soakDuration, &s.errs) })
	wg.Go(func() {
		s.streams = soakStreams(ctx, inst, s.cfg.soakStreams, s.cfg.soakChunkDelay, begin.Add(s.cfg.soakDuration), &s.errs)
	})
	samplingErr := s.sample(ctx, inst, adm, begin)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	if samplingErr != nil {
		return fmt.Errorf("sampling the proxy under load: %w", samplingErr)
	}
	var err error
	s.peakRSS, err = inst.caddy.peakRSS()
	return err
}

// sample takes the proxy's figures at the end of every second of the load.
func (s *soakRun) sample(ctx context.Context, inst *instance, adm *http.Client, begin time.Time) error {
	for i := 1; i <= int(s.cfg.soakDuration/time.Second); i++ {
		select {
		case <-time.After(time.Until(begin.Add(time.Duration(i) * time.Second))):
		case <-ctx.Done():
			return ctx.Err()
		}
		f, err := inst.caddy.figures(ctx, adm)
		if err != nil {
			return err
		}
		s.rss = append(s.rss, f.rss)
		s.peak.goroutines = max(s.peak.goroutines, f.goroutines)
		s.peak.fds = max(s.peak.fds, f.fds)
		if i%10 == 0 {
			fmt.Printf("soak: %3d s  %s  %d errors\n", i, f, s.errs.count())
		}
	}
	return nil
}

// pacedChats sends small chats at rate a second for d, and counts what
// was not a 200 as an error. At most conns are in flight, the concurrency
// the maximum was measured at: when the machine cannot keep the pace, the
// chats fall behind instead of opening ever more connections, whose
// buffers would read as memory growth.
func pacedChats(ctx context.Context, inst *instance, conns, rate int, d time.Duration, errs *errorLog) sample {
	n := uint64(conns)
	atk := vegeta.NewAttacker(vegeta.Client(inst.client), vegeta.Workers(n), vegeta.MaxWorkers(n), vegeta.Redirects(vegeta.NoFollow))
	defer context.AfterFunc(ctx, func() { atk.Stop() })()
	var c collector
	pacer := vegeta.Rate{Freq: rate, Per: time.Second}
	for res := range atk.Attack(vegeta.NewStaticTargeter(chatRequests(benchTier)(inst)...), pacer, d, "") {
		c.add(res)
		if res.Code != http.StatusOK || res.Error != "" {
			errs.add(res.End(), fmt.Sprintf("chat: %d %s %.200s", res.Code, res.Error, res.Body))
		}
	}
	return c.sample()
}

// soakStreams keeps n streams open until the deadline, logging each that
// failed.
func soakStreams(ctx context.Context, inst *instance, n int, chunkDelay time.Duration, deadline time.Time, errs *errorLog) sample {
	begin := time.Now()
	all := keepStreams(ctx, inst, n, chunkDelay, deadline, func(r streamResult) {
		errs.add(time.Now(), "stream: "+r.err.Error())
	})
	return streamSample(all, time.Since(begin))
}

// errorLog counts the soak's unexpected errors and keeps the first few,
// with when they happened. It is safe for concurrent use.
type errorLog struct {
	began time.Time // the load's start; set before use

	mu    sync.Mutex // protects following fields
	n     int
	first []string
}

func (l *errorLog) add(at time.Time, msg string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n++; len(l.first) < keptErrors {
		l.first = append(l.first, fmt.Sprintf("at %v: %s", at.Sub(l.began).Round(time.Millisecond), msg))
	}
}

func (l *errorLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// closeIdle closes the idle connections on both sides of the proxy, the
// harness's to it and its own to the upstream, so that the proxy's counts
// hold what it keeps by itself, not its connection pools.
func closeIdle(inst *instance, upstream *http.Server) {
	inst.client.CloseIdleConnections()
	upstream.SetKeepAlivesEnabled(false) // closes the idle connections
	upstream.SetKeepAlivesEnabled(true)
}

// drain closes the idle connections after the load and polls the proxy
// until its goroutines and open files are back within the slack of base,
// or soakDrain has passed. It returns the last figures.
func drain(ctx context.Context, inst *instance, closeIdle func(), adm *http.Client, base procFigures) (procFigures, error) {
	deadline := time.Now().Add(soakDrain)
	for {
		closeIdle()
		f, err := inst.caddy.figures(ctx, adm)
		if err != nil || f.backTo(base) || time.Now().After(deadline) {
			return f, err
		}
		select {
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
			return f, ctx.Err()
		}
	}
}

// backTo reports whether f's goroutines and open files are back within
// the slack of base.
func (f procFigures) backTo(base procFigures) bool {
	return f.goroutines <= base.goroutines+goroutineSlack && f.fds <= base.fds+fdSlack
}

func (f procFigures) String() string {
	return fmt.Sprintf("%d goroutines, %d open files, RSS %s", f.goroutines, f.fds, fmtBytes(f.rss))
}

// figures counts the process's open files and reads its RSS from /proc,
// and its goroutines from the admin endpoint's goroutine profile.
func (p *caddyProcess) figures(ctx context.Context, adm *http.Client) (procFigures, error) {
	var f procFigures
	pid := p.cmd.Process.Pid
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return f, err
	}
	f.fds = len(fds)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return f, err
	}
	if f.rss, err = statusBytes(status, "VmRSS:"); err != nil {
		return f, err
	}
	f.goroutines, err = goroutines(ctx, adm, p.adminURL)
	return f, err
}

// goroutines returns the number of goroutines of the Caddy whose admin
// endpoint is adminURL, from the first line of its goroutine profile.
func goroutines(ctx context.Context, adm *http.Client, adminURL string) (int, error) {
	head, err := adminGet(ctx, adm, adminURL+"/debug/pprof/goroutine?debug=1", 256)
	if err != nil {
		return 0, err
	}
	return parseGoroutineTotal(head)
}

// liveHeap returns the live heap of the Caddy whose admin endpoint is
// adminURL: HeapAlloc right after the garbage collections that gc=1 asks
// the heap profile for. It takes two: what sync.Pools hold outlives the
// first.
func liveHeap(ctx context.Context, adm *http.Client, adminURL string) (int64, error) {
	var heap int64
	for range 2 {
		profile, err := adminGet(ctx, adm, adminURL+"/debug/pprof/heap?gc=1&debug=1", -1)
		if err != nil {
			return 0, err
		}
		if heap, err = parseHeapAlloc(profile); err != nil {
			return 0, err
		}
	}
	return heap, nil
}

// adminGet returns the first limit bytes of the body of url on Caddy's
// admin endpoint, or all of it when limit is negative.
func adminGet(ctx context.Context, adm *http.Client, url string, limit int64) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	res, err := adm.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, res.Status)
	}
	var body io.Reader = res.Body
	if limit >= 0 {
		body = io.LimitReader(body, limit)
	}
	return io.ReadAll(body)
}

// parseHeapAlloc reads HeapAlloc from the runtime.MemStats comments that
// end a heap profile of debug=1.
func parseHeapAlloc(profile []byte) (int64, error) {
	for line := range bytes.Lines(profile) {
		if v, ok := bytes.CutPrefix(line, []byte("# HeapAlloc = ")); ok {
			return strconv.ParseInt(string(bytes.TrimSpace(v)), 10, 64)
		}
	}
	return 0, errors.New("no HeapAlloc in the heap profile")
}

// parseGoroutineTotal reads N from a profile starting
// "goroutine profile: total N".
func parseGoroutineTotal(profile []byte) (int, error) {
	line, _, _ := bytes.Cut(profile, []byte("\n"))
	n, ok := bytes.CutPrefix(line, []byte("goroutine profile: total "))
	if !ok {
		return 0, fmt.Errorf("not a goroutine profile: %.80q", line)
	}
	return strconv.Atoi(string(n))
}

// A soakCheck is one of the soak's verdicts.
type soakCheck struct {
	text string
	v    verdict
}

// rssAt returns VmRSS at the end of second d of the load.
func (s *soakRun) rssAt(d time.Duration) int64 { return s.rss[int(d/time.Second)-1] }

// growth is the relative change of RSS from soakSettle to the end.
func (s *soakRun) growth() float64 {
	from := s.rssAt(soakSettle)
	return float64(s.rss[len(s.rss)-1]-from) / float64(from)
}

func (s *soakRun) checks() []soakCheck {
	errs := s.errs.count()
	end := s.rss[len(s.rss)-1]
	return []soakCheck{
		{
			text: "No unexpected errors: a status other than 200, a failed connection, a stream without `[DONE]`",
			v: verdict{measured: true, met: errs == 0,
				figure: fmt.Sprintf("%d in %d requests and %d streams", errs, s.plain.ok+s.plain.errors, s.streams.ok+s.streams.errors)},
		},
		{
			text: fmt.Sprintf("RSS growth from second %d to second %d under %.0f%%", int(soakSettle.Seconds()), len(s.rss), soakMaxGrowth*100),
			v: verdict{measured: true, met: s.growth() < soakMaxGrowth,
				figure: fmt.Sprintf("%s → %s: %s%%", fmtBytes(s.rssAt(soakSettle)), fmtBytes(end), strings.Replace(fmt.Sprintf("%+.1f", s.growth()*100), "-", "−", 1))},
		},
		{
			text: fmt.Sprintf("Goroutines back to the baseline (+%d allowed)", goroutineSlack),
			v: verdict{measured: true, met: s.after.goroutines <= s.base.goroutines+goroutineSlack,
				figure: fmt.Sprintf("%d before, %d at most under load, %d after", s.base.goroutines, s.peak.goroutines, s.after.goroutines)},
		},
		{
			text: fmt.Sprintf("Open files back to the baseline (+%d allowed)", fdSlack),
			v: verdict{measured: true, met: s.after.fds <= s.base.fds+fdSlack,
				figure: fmt.Sprintf("%d before, %d at most under load, %d after", s.base.fds, s.peak.fds, s.after.fds)},
		},
	}
}

// behind reports whether the paced chats were answered at less than 95%
// of their rate.
func (s *soakRun) behind() bool { return s.plain.rate < 0.95*float64(s.rate) }

// markdown renders the soak's section of the report, markers included.
func (s *soakRun) markdown() []byte {
	cfg := s.cfg
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\n## Soak\n\n", soakBegin)
	fmt.Fprintf(&b, "Written by `make soak` (`go run ./bench -soak`) on %s, apart from the figures above: `make bench` keeps this section, `make soak` rewrites it. "+
		"The `%s` target (this module, SQLite store) on %d cores, load average %s when the run began; Caddy %s.\n\n",
		s.began.UTC().Format("2006-01-02 15:04 MST"), moduleName, s.machine.cores, s.machine.loadAverage, s.machine.caddyVersion)
	fmt.Fprintf(&b, "| check | this run | verdict |\n|---|---|---|\n")
	for _, c := range s.checks() {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", c.text, c.v.figure, c.v)
	}
	fmt.Fprintf(&b, "\n- Maximum: %.0f small chats/s (the `%s` workload, %d connections, %v after a %v warm-up), measured just before the soak.\n",
		s.maxRate, chatWorkload, cfg.conns, soakProbe, cfg.warmup)
	fmt.Fprintf(&b, "- Load, for %.0f s: small chats paced at half the maximum, %d/s from at most %d connections (answered %.0f/s, p50 %s, p99 %s), "+
		"and %d streams at once, each of %d tokens with the upstream waiting %v between events and opened again as soon as it ended "+
		"(%d streams, %.1f/s, first event p50 %s, p99 %s).\n",
		cfg.soakDuration.Seconds(), s.rate, cfg.conns, s.plain.rate, fmtDur(float64(s.plain.p50)), fmtDur(float64(s.plain.p99)),
		cfg.soakStreams, streamTokens, cfg.soakChunkDelay,
		s.streams.ok, s.streams.rate, fmtDur(float64(s.streams.p50)), fmtDur(float64(s.streams.p99)))
	if s.behind() {
		fmt.Fprintf(&b, "- The chats fell behind their pace, %.0f/s of %d/s: the machine was saturated, the load generator and the upstream running on the same %d cores as the proxy. "+
			"The soak then ran at what the proxy could serve, with at most %d chats in flight.\n", s.plain.rate, s.rate, s.machine.cores, cfg.conns)
	}
	fmt.Fprintf(&b, "- Completed: %d requests and %d streams; unexpected errors: %d.\n", s.plain.ok, s.streams.ok, s.errs.count())
	var every []string
	for i := 9; i < len(s.rss); i += 10 {
		every = append(every, fmt.Sprintf("%d s %s", i+1, fmtBytes(s.rss[i])))
	}
	fmt.Fprintf(&b, "- RSS: %s before; %s; peak %s (VmHWM over the load); %s after.\n",
		fmtBytes(s.base.rss), strings.Join(every, ", "), fmtBytes(s.peakRSS), fmtBytes(s.after.rss))
	fmt.Fprintf(&b, "- Live heap (HeapAlloc after forced garbage collections): %s before, %s after.\n", fmtBytes(s.baseHeap), fmtBytes(s.afterHeap))
	fmt.Fprintf(&b, "- Goroutines %d → %d at most → %d, open files %d → %d at most → %d (before, under load, after).\n",
		s.base.goroutines, s.peak.goroutines, s.after.goroutines, s.base.fds, s.peak.fds, s.after.fds)
	for _, e := range s.errs.first {
		fmt.Fprintf(&b, "- Error %s\n", strings.ReplaceAll(e, "\n", " "))
	}
	fmt.Fprintf(&b, `
Goroutines come from the admin endpoint's `+"`/debug/pprof/goroutine`"+`, open files
from /proc/PID/fd, RSS from VmRSS, each second of the load. Before the
baseline and after the load, the idle connections on both sides of the
proxy (the harness's to it, its own to the upstream) are closed, so that
the counts hold what the proxy keeps by itself rather than its connection
pools; the after figures are taken as soon as they are back within the
allowance, or %v after the load.
%s
`, soakDrain, soakEnd)
	return b.Bytes()
}

// writeKeepingSoak writes the benchmark's report to path, keeping the
// soak section of the report it replaces.
func writeKeepingSoak(path string, report []byte) error {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if begin, end, ok := findSection(old, soakBegin, soakEnd); ok {
		report = withSection(report, old[begin:end], soakBegin, soakEnd)
	}
	return os.WriteFile(path, report, 0o644)
}
