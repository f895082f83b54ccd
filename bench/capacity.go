package main

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/pause"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// The capacity model of the Redis store: what a request costs Redis
// (commands, bytes, CPU), read from Redis' own INFO before and after a
// known number of requests through one instance, the instances' steady
// background subtracted; what a caller costs in memory, in Redis and in
// an instance, idle (a key in the store) and active (after one request);
// and from them how many requests a second one Redis serves and how many
// instances that is.
const (
	// capRequests is the admitted chats of each chat phase, capStreams
	// the streams, capRefused the refused chats.
	capRequests = 3000
	capStreams  = 500
	capRefused  = 1000
	// capConns is the phases' concurrency: each connection sends its
	// next request when its last was answered.
	capConns = 16
	// capCallers is the number of callers of each chat phase's tier.
	capCallers = 16
	// capIdle is the window of the instance's background, with nothing
	// sent.
	capIdle = 3 * time.Second
	// capSettle is waited after each phase, so that what the instance
	// writes behind its requests (the usage ledger each second, the
	// keys' last use each 5 seconds) is in the phase's window.
	capSettle = 6 * time.Second
	// capMemCallers is the callers of the memory phase.
	capMemCallers = 10000
)

// Markers of the capacity model's section in the report.
const (
	capacityBegin = "<!-- capacity -->"
	capacityEnd   = "<!-- /capacity -->"
)

// capacitySite has a tier whose every request Redis decides (a
// concurrency limit keeps it from slices), one whose buckets, quota and
// budget are sliced (redis_slices.go), and one that refuses all but one
// request an hour.
const capacitySite = `
http://127.0.0.1:{{.Port}} {
	bind 127.0.0.1
	vigthoria {
		upstream {{.Upstream}}/v1
{{.Keys}}
		store {{.Store}}
		tier exact {
			requests 600000/1m
			tokens 1000000000/1m
			concurrent 1000
			quota 1000000000000/month
		}
		tier sliced {
			requests 1000000000/1m
			tokens 1000000000000/1m
			quota 1000000000000/month
			budget 1000000/month
		}
		prices {
			vigthoria-fast-* input 0.10 output 0.40
		}
		tier refused {
			requests 1/1h
		}
	}
}
`

// capacityKeys names the client keys of the per-request phases.
func capacityKeys(f func(tier string, i int) error) error {
	for _, tier := range []string{"exact", "sliced"} {
		for i := range capCallers {
			if err := f(tier, i); err != nil {
				return err
			}
		}
	}
	return f("refused", 0)
}

// redisStats is one reading of Redis' INFO.
type redisStats struct {
	calls   map[string]float64 // commands run, by name, scripts' own included
	scripts float64            // µs spent running scripts (EVALSHA and EVAL), by commandstats
	in, out float64            // bytes read from and written to clients
	cpu     float64            // used_cpu_sys + used_cpu_user, µs
	memory  int64              // used_memory
	reply   int                // the length of this reading's own reply
}

// infoSections are the sections every reading asks for, in one command.
var infoSections = []string{"commandstats", "stats", "cpu", "memory"}

// readStats reads Redis' INFO. c must hold one connection, made before,
// so that no connection's handshake counts.
func readStats(ctx context.Context, c *goredis.Client) (redisStats, error) {
	text, err := c.Info(ctx, infoSections...).Result()
	if err != nil {
		return redisStats{}, fmt.Errorf("INFO: %w", err)
	}
	return parseInfo(text)
}

// parseInfo reads the figures of redisStats out of INFO's text.
func parseInfo(text string) (redisStats, error) {
	s := redisStats{calls: map[string]float64{}, reply: len(text)}
	var cpuSys, cpuUser float64
	seen := 0
	for line := range strings.Lines(text) {
		name, value, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		if cmd, ok := strings.CutPrefix(name, "cmdstat_"); ok {
			calls, rest, _ := strings.Cut(strings.TrimPrefix(value, "calls="), ",")
			n, err := strconv.ParseFloat(calls, 64)
			if err != nil {
				return s, fmt.Errorf("INFO %s: %w", name, err)
			}
			s.calls[cmd] = n
			if cmd == "evalsha" || cmd == "eval" {
				usec, _, _ := strings.Cut(strings.TrimPrefix(rest, "usec="), ",")
				us, err := strconv.ParseFloat(usec, 64)
				if err != nil {
					return s, fmt.Errorf("INFO %s: %w", name, err)
				}
				s.scripts += us
			}
			continue
		}
		var dst *float64
		switch name {
		case "total_net_input_bytes":
			dst = &s.in
		case "total_net_output_bytes":
			dst = &s.out
		case "used_cpu_sys":
			dst = &cpuSys
		case "used_cpu_user":
			dst = &cpuUser
		case "used_memory":
			n, err := strconv.ParseInt(value, 10, 64)
			if err != nil {
				return s, fmt.Errorf("INFO %s: %w", name, err)
			}
			s.memory = n
			seen++
			continue
		default:
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			return s, fmt.Errorf("INFO %s: %w", name, err)
		}
		*dst = v
		seen++
	}
	if seen != 5 {
		return s, fmt.Errorf("INFO lacks some of its figures (%d of 5 found)", seen)
	}
	s.cpu = (cpuSys + cpuUser) * 1e6
	return s, nil
}

// usage is what Redis did between two readings, the first reading's own
// reply and the second's command taken out.
type usage struct {
	calls   map[string]float64
	scripts float64 // µs running scripts
	in, out float64
	cpu     float64 // µs
}

// since returns what Redis did from before to s. INFO's own calls are
// left out.
func (s redisStats) since(before redisStats) usage {
	u := usage{calls: map[string]float64{}, scripts: s.scripts - before.scripts,
		in:  s.in - before.in - float64(infoCommandLen()),
		out: s.out - before.out - float64(before.reply),
		cpu: s.cpu - before.cpu}
	for cmd, n := range s.calls {
		if d := n - before.calls[cmd]; d > 0 && cmd != "info" {
			u.calls[cmd] = d
		}
	}
	return u
}

// infoCommandLen is the length of the INFO command as a client sends it
// (RESP), which Redis counts in its input bytes.
func infoCommandLen() int {
	args := append([]string{"info"}, infoSections...)
	n := len(fmt.Sprintf("*%d\r\n", len(args)))
	for _, a := range args {
		n += len(fmt.Sprintf("$%d\r\n%s\r\n", len(a), a))
	}
	return n
}

// minus returns u less the background's rate over d, nothing below zero.
func (u usage) minus(background usage, over, d time.Duration) usage {
	k := d.Seconds() / over.Seconds()
	out := usage{calls: map[string]float64{}, scripts: max(0, u.scripts-k*background.scripts),
		in:  max(0, u.in-k*background.in),
		out: max(0, u.out-k*background.out),
		cpu: max(0, u.cpu-k*background.cpu)}
	for cmd, n := range u.calls {
		if v := n - k*background.calls[cmd]; v > 0 {
			out.calls[cmd] = v
		}
	}
	return out
}

// per returns u divided by n.
func (u usage) per(n float64) usage {
	out := usage{calls: map[string]float64{}, scripts: u.scripts / n, in: u.in / n, out: u.out / n, cpu: u.cpu / n}
	for cmd, v := range u.calls {
		out.calls[cmd] = v / n
	}
	return out
}

// total is the commands of u.
func (u usage) total() float64 {
	t := 0.0
	for _, n := range u.calls {
		t += n
	}
	return t
}

// capPhase is one phase of known requests through one instance.
type capPhase struct {
	name, about string
	answers     map[int]int
	counted     int           // the requests the figures are per: admitted, or refused
	took        time.Duration // from the first request sent to the last answer
	window      time.Duration // from the reading before to the one after
	perRequest  usage         // Redis' work per counted request, the background taken out
	caddyCPU    time.Duration // the instance's CPU per counted request
}

func (p *capPhase) rate() float64 { return float64(p.counted) / p.took.Seconds() }

// capKind is one kind of Redis key, as the memory phase found them.
type capKind struct {
	pattern      string
	keys         int
	bytes        int64 // MEMORY USAGE, summed
	ttlLo, ttlHi time.Duration
	noTTL        int // keys without an expiry
	perCaller    float64
}

// capMemory is what the memory phase saw.
type capMemory struct {
	callers int
	answers map[int]int
	// used_memory of Redis, and the instance's RSS and live heap: before
	// the callers' keys were created, once they were (idle), and after
	// each made one request (active).
	redis, rss, heap [3]int64
	kinds            []capKind
}

// capacityRun is what the capacity model measured.
type capacityRun struct {
	began      time.Time
	pinned     bool // Caddy on caddyCPU, the harness and Redis on the others
	machine    machine
	elapsed    time.Duration
	background usage // per second, of one idle instance
	phases     []*capPhase
	memory     *capMemory
}

// runCapacity measures the capacity model, each part on processes of its
// own.
func runCapacity(ctx context.Context, cfg config) (*capacityRun, error) {
	run := &capacityRun{began: time.Now(), pinned: caddyCPU >= 0}
	m, dir, err := scenarioStart(cfg, "vigthoria-capacity-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	run.machine = m
	if err := run.measureRequests(ctx, cfg, filepath.Join(dir, "requests")); err != nil {
		return nil, fmt.Errorf("per request: %w", err)
	}
	if run.memory, err = measureMemory(ctx, cfg, filepath.Join(dir, "memory")); err != nil {
		return nil, fmt.Errorf("per caller: %w", err)
	}
	run.elapsed = time.Since(run.began)
	return run, nil
}

// startCapacity starts the stand-in, recording nothing, a redis-server
// in dir, and one instance of capacitySite on it with the keys each
// names.
func startCapacity(ctx context.Context, cfg config, dir string, each func(func(string, int) error) error) (*limitedUpstream, *redistest.Server, *instance, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, nil, err
	}
	up, err := startLimitedUpstream(0, false)
	if err != nil {
		return nil, nil, nil, err
	}
	redis, err := redistest.Run(dir)
	if err != nil {
		up.close()
		return nil, nil, nil, err
	}
	insts, err := startSites(ctx, cfg.caddy, dir, up, capacitySite, each, "exact", scarceData{Keys: oneKey}, 1, redis.URL)
	if err != nil {
		stopAll(insts)
		redis.Stop()
		up.close()
		return nil, nil, nil, err
	}
	return up, redis, insts[0], nil
}

// statsClient is a client of one connection to the Redis at addr, made
// at once.
func statsClient(ctx context.Context, addr string) (*goredis.Client, error) {
	c := goredis.NewClient(&goredis.Options{Addr: addr, PoolSize: 1, MinIdleConns: 1})
	if err := c.Ping(ctx).Err(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// measureRequests runs the per-request phases on one instance.
func (run *capacityRun) measureRequests(ctx context.Context, cfg config, dir string) error {
	up, redis, inst, err := startCapacity(ctx, cfg, dir, capacityKeys)
	if err != nil {
		return err
	}
	defer up.close()
	defer redis.Stop()
	defer inst.caddy.stop()
	rc, err := statsClient(ctx, redis.Addr)
	if err != nil {
		return err
	}
	defer rc.Close()
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: capConns, DisableCompression: true}}
	defer client.CloseIdleConnections()

	// The warm-up: connections, the scripts loaded, the refused
	// caller's one request an hour spent.
	fmt.Println("capacity: warm-up, then the instance's background")
	for _, tier := range []string{"exact", "sliced"} {
		closedLoop(ctx, client, inst.url, inst.keys[tier], chatBody, 200, capConns)
	}
	closedLoop(ctx, client, inst.url, inst.keys["refused"], chatBody, 1, 1)
	if !pause.For(ctx, capSettle) {
		return ctx.Err()
	}
	before, err := readStats(ctx, rc)
	if err != nil {
		return err
	}
	if !pause.For(ctx, capIdle) {
		return ctx.Err()
	}
	after, err := readStats(ctx, rc)
	if err != nil {
		return err
	}
	run.background = after.since(before).per(capIdle.Seconds())

	for _, ph := range []struct {
		name, about, tier string
		body              []byte
		n                 int
		want              int // the status counted
	}{
		{"chat", "small chats of tier `exact`: every request admitted by Redis", "exact", chatBody, capRequests, http.StatusOK},
		{"chat, sliced", "small chats of tier `sliced`: with a quota and a budget: admitted from the instance's slices of the callers' buckets, quota and budget", "sliced", chatBody, capRequests, http.StatusOK},
		{"stream", fmt.Sprintf("streamed chats of %d tokens, tier `exact`", streamTokens), "exact", streamBody, capStreams, http.StatusOK},
		{"refused", "small chats of tier `refused`, one caller past its limit: refused 429", "refused", chatBody, capRefused, http.StatusTooManyRequests},
	} {
		before, err := readStats(ctx, rc)
		if err != nil {
			return err
		}
		cpuBefore, err := inst.caddy.cpuTime()
		if err != nil {
			return err
		}
		began := time.Now()
		answers, took := closedLoop(ctx, client, inst.url, inst.keys[ph.tier], ph.body, ph.n, capConns)
		cpuAfter, err := inst.caddy.cpuTime()
		if err != nil {
			return err
		}
		if !pause.For(ctx, capSettle) {
			return ctx.Err()
		}
		after, err := readStats(ctx, rc)
		if err != nil {
			return err
		}
		window := time.Since(began)
		p := &capPhase{name: ph.name, about: ph.about, answers: answers, counted: answers[ph.want], took: took, window: window}
		if p.counted == 0 {
			return fmt.Errorf("%s: no request answered %d (%s)", ph.name, ph.want, statusText(answers))
		}
		p.perRequest = after.since(before).minus(run.background, time.Second, window).per(float64(p.counted))
		p.caddyCPU = (cpuAfter - cpuBefore) / time.Duration(p.counted)
		run.phases = append(run.phases, p)
		fmt.Printf("capacity: %s: %s in %v; per request %.1f commands, %.0f B in, %.0f B out, Redis CPU %.1f µs, instance CPU %v\n",
			p.name, statusText(answers), took.Round(time.Millisecond), p.perRequest.total(), p.perRequest.in, p.perRequest.out, p.perRequest.cpu, p.caddyCPU)
	}
	return nil
}

// closedLoop sends n requests of body from conns workers, each sending
// its next when its last was answered, the i-th with keys[i%len(keys)],
// and counts the answers by status.
func closedLoop(ctx context.Context, client *http.Client, url string, keys []string, body []byte, n, conns int) (map[int]int, time.Duration) {
	var next atomic.Int64
	var mu sync.Mutex
	answers := map[int]int{}
	began := time.Now()
	var wg sync.WaitGroup
	for range min(conns, n) {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				o := sendBody(ctx, client, url, keys[i%len(keys)], body)
				mu.Lock()
				answers[o.status]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return answers, time.Since(began)
}

// measureMemory creates capMemCallers keys in the store of a running
// instance, then has each make one request, and reads Redis' and the
// instance's memory before, idle and active.
func measureMemory(ctx context.Context, cfg config, dir string) (*capMemory, error) {
	readyKey := func(f func(string, int) error) error { return f("exact", 0) }
	up, redis, inst, err := startCapacity(ctx, cfg, dir, readyKey)
	if err != nil {
		return nil, err
	}
	defer up.close()
	defer redis.Stop()
	defer inst.caddy.stop()
	rc, err := statsClient(ctx, redis.Addr)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	adm := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: capConns, DisableCompression: true}}
	defer client.CloseIdleConnections()
	m := &capMemory{callers: capMemCallers}
	read := func(i int) error {
		closeIdle(inst, up.srv)
		client.CloseIdleConnections()
		time.Sleep(500 * time.Millisecond) // for the connections' goroutines to end
		s, err := readStats(ctx, rc)
		if err != nil {
			return err
		}
		f, err := inst.caddy.figures(ctx, adm)
		if err != nil {
			return err
		}
		m.redis[i], m.rss[i] = s.memory, f.rss
		m.heap[i], err = liveHeap(ctx, adm, inst.caddy.adminURL)
		return err
	}
	if err := read(0); err != nil {
		return nil, err
	}

	fmt.Printf("capacity: %d callers' keys\n", capMemCallers)
	secrets, err := createKeys(ctx, redis.URL, "exact", capMemCallers)
	if err != nil {
		return nil, err
	}
	if err := waitKnown(ctx, inst, secrets[len(secrets)-1]); err != nil {
		return nil, err
	}
	if !pause.For(ctx, capSettle) {
		return nil, ctx.Err()
	}
	if err := read(1); err != nil {
		return nil, err
	}

	fmt.Printf("capacity: one request of each of %d callers\n", capMemCallers)
	m.answers, _ = closedLoop(ctx, client, inst.url, secrets, chatBody, capMemCallers, capConns)
	if m.answers[http.StatusOK] != capMemCallers {
		return nil, fmt.Errorf("the callers' requests got %s", statusText(m.answers))
	}
	if !pause.For(ctx, capSettle) {
		return nil, ctx.Err()
	}
	if err := read(2); err != nil {
		return nil, err
	}
	if m.kinds, err = keyKinds(ctx, rc, capMemCallers); err != nil {
		return nil, err
	}
	fmt.Printf("capacity: Redis used_memory %s, %s, %s; instance live heap %s, %s, %s (before, idle, active)\n",
		fmtBytes(m.redis[0]), fmtBytes(m.redis[1]), fmtBytes(m.redis[2]), fmtBytes(m.heap[0]), fmtBytes(m.heap[1]), fmtBytes(m.heap[2]))
	return m, nil
}

// createKeys creates n client keys of tier in the store at url, a few at
// a time, and returns their secrets.
func createKeys(ctx context.Context, url, tier string, n int) ([]string, error) {
	st, err := store.Open(url)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	secrets := make([]string, n)
	var next atomic.Int64
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for range cap(errs) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				_, secret, err := keys.Create(ctx, st, keys.Attrs{Name: fmt.Sprintf("caller-%d", i), Tier: tier}, time.Now())
				if err != nil {
					errs <- err
					return
				}
				secrets[i] = secret
			}
		})
	}
	wg.Wait()
	close(errs)
	return secrets, <-errs
}

// waitKnown waits until the instance knows the key secret, created last:
// it has then read every key created before it. It asks at most a dozen
// times, so that its 401s stay below the throttle of failed
// authentication.
func waitKnown(ctx context.Context, inst *instance, secret string) error {
	for range 12 {
		status, _, err := get(ctx, inst.client, inst.url+"/v1/models", secret)
		if err == nil && status == http.StatusOK {
			return nil
		}
		if !pause.For(ctx, 500*time.Millisecond) {
			return ctx.Err()
		}
	}
	return fmt.Errorf("the instance did not know the last key within 6s")
}

// keyPatterns name a Redis key's kind: the parts that name a client, a
// key, a period or a writer replaced.
var keyPatterns = []struct {
	re   *regexp.Regexp
	with string
}{
	{regexp.MustCompile(`^vgt:key:.*`), "vgt:key:<id>"},
	{regexp.MustCompile(`\{[^}]*\}`), "{<client>}"},
	{regexp.MustCompile(`^vgt:usage:.*:\d{4}-\d{2}-\d{2}$`), "vgt:usage:<client>:<day>"},
	{regexp.MustCompile(`^(vgt:usage-hour:).*`), "${1}<hour>"},
	{regexp.MustCompile(`^(vgt:usage-slot:).*`), "${1}<slot>"},
	{regexp.MustCompile(`^(vgt:usage-writer:).*`), "${1}<writer>"},
	{regexp.MustCompile(`:\d{4}-\d{2}(-\d{2})?$`), ":<period>"},
}

// kindOf returns the kind of the Redis key k.
func kindOf(k string) string {
	for _, p := range keyPatterns {
		k = p.re.ReplaceAllString(k, p.with)
	}
	return k
}

// keyKinds reads every key of the Redis, its memory and expiry, and sums
// them by kind; a kind's memory per caller is its sum over callers.
func keyKinds(ctx context.Context, rc *goredis.Client, callers int) ([]capKind, error) {
	var names []string
	iter := rc.Scan(ctx, 0, "*", 1000).Iterator()
	for iter.Next(ctx) {
		names = append(names, iter.Val())
	}
	if err := iter.Err(); err != nil {
		return nil, err
	}
	kinds := map[string]*capKind{}
	for page := range slices.Chunk(names, 1000) {
		mem := make([]*goredis.IntCmd, len(page))
		ttl := make([]*goredis.DurationCmd, len(page))
		_, err := rc.Pipelined(ctx, func(p goredis.Pipeliner) error {
			for i, k := range page {
				mem[i] = p.MemoryUsage(ctx, k, 0)
				ttl[i] = p.PTTL(ctx, k)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		for i, k := range page {
			name := kindOf(k)
			kd := kinds[name]
			if kd == nil {
				kd = &capKind{pattern: name, ttlLo: -1}
				kinds[name] = kd
			}
			kd.keys++
			kd.bytes += mem[i].Val()
			switch d := ttl[i].Val(); {
			case d < 0:
				kd.noTTL++
			default:
				if kd.ttlLo < 0 || d < kd.ttlLo {
					kd.ttlLo = d
				}
				kd.ttlHi = max(kd.ttlHi, d)
			}
		}
	}
	var out []capKind
	for _, name := range slices.Sorted(maps.Keys(kinds)) {
		kd := kinds[name]
		kd.perCaller = float64(kd.bytes) / float64(callers)
		out = append(out, *kd)
	}
	return out, nil
}

// capacityOnly measures the capacity model alone and rewrites its
// section of cfg.out.
func capacityOnly(ctx context.Context, cfg config) error {
	run, err := runCapacity(ctx, cfg)
	if err != nil {
		return err
	}
	if err := rewriteSection(cfg.out, run.markdown(), capacityBegin, capacityEnd); err != nil {
		return err
	}
	fmt.Printf("capacity: wrote its section of %s in %v\n", cfg.out, run.elapsed.Round(time.Second))
	return nil
}

// shownCommands are the commands of the per-request table, in its order:
// those that reach Redis from the request path and from behind it.
func (run *capacityRun) shownCommands() []string {
	seen := map[string]float64{}
	for _, p := range run.phases {
		for cmd, n := range p.perRequest.calls {
			seen[cmd] = max(seen[cmd], n)
		}
	}
	for cmd, n := range run.background.calls {
		seen[cmd] = max(seen[cmd], n)
	}
	cmds := slices.Collect(maps.Keys(seen))
	slices.SortFunc(cmds, func(a, b string) int {
		switch {
		case seen[a] > seen[b]:
			return -1
		case seen[a] < seen[b]:
			return 1
		}
		return strings.Compare(a, b)
	})
	return cmds
}

// markdown renders the capacity model's section of the report, markers
// included.
func (run *capacityRun) markdown() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\n## Capacity of the Redis store\n\n", capacityBegin)
	where := placement("Caddy", run.pinned)
	fmt.Fprintf(&b, "Written by `make bench`, or alone by `make bench-capacity` (`go run ./bench -capacity-only`), on %s in %v: %s, %d cores, load average %s when it began; "+
		"redis-server on loopback, without persistence; %s. "+
		"Redis' figures are its own (`INFO commandstats`, `stats`, `cpu`), read before and after each phase, which ends %v after its last answer "+
		"so that what the instance writes behind its requests (the usage ledger each second, the keys' last use each 5 s) is in it; "+
		"the instance's background, measured idle for %v, is taken out in proportion to each phase's time. "+
		"Each phase sends its requests from %d connections, each its next when its last was answered, through one instance.\n\n",
		run.began.UTC().Format("2006-01-02 15:04 MST"), run.elapsed.Round(time.Second), run.machine.cpu, run.machine.cores, run.machine.loadAverage,
		where, capSettle, capIdle, capConns)

	fmt.Fprintf(&b, "| phase | requests counted | the instance's req/s | its CPU per request | Redis commands per request | bytes in / out per request | Redis CPU per request | time in scripts (wall clock, `commandstats`) |\n|---|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, p := range run.phases {
		fmt.Fprintf(&b, "| %s: %s | %d (%s) | %.0f | %s | %.2f | %.0f / %.0f | %.1f µs | %.1f µs |\n",
			p.name, p.about, p.counted, statusText(p.answers), p.rate(), fmtDur(float64(p.caddyCPU)),
			p.perRequest.total(), p.perRequest.in, p.perRequest.out, p.perRequest.cpu, p.perRequest.scripts)
	}
	bg := run.background
	fmt.Fprintf(&b, "| background of one idle instance, a second | — | — | — | %.1f | %.0f / %.0f | %.0f µs | %.0f µs |\n\n", bg.total(), bg.in, bg.out, bg.cpu, bg.scripts)

	fmt.Fprintf(&b, "Commands by name, per request (a second for the background). `evalsha` is a script's call; "+
		"Redis counts the commands a script runs under their own names as well, so the commands a client sends are `evalsha` and the plain commands, "+
		"and the others are the scripts' work:\n\n| command |")
	for _, p := range run.phases {
		fmt.Fprintf(&b, " %s |", p.name)
	}
	fmt.Fprintf(&b, " background |\n|---|%s--:|\n", strings.Repeat("--:|", len(run.phases)))
	for _, cmd := range run.shownCommands() {
		fmt.Fprintf(&b, "| `%s` |", cmd)
		for _, p := range run.phases {
			fmt.Fprintf(&b, " %s |", fmtCalls(p.perRequest.calls[cmd]))
		}
		fmt.Fprintf(&b, " %s |\n", fmtCalls(bg.calls[cmd]))
	}

	if m := run.memory; m != nil {
		per := func(i, j int, v [3]int64) string {
			return fmt.Sprintf("%.0f B", float64(v[j]-v[i])/float64(m.callers))
		}
		fmt.Fprintf(&b, "\nMemory per caller: %d client keys of tier `exact` created in the store of a running instance (idle callers), then one small chat of each (active callers, read %v after the last). "+
			"Redis' `used_memory`; the instance's RSS and live heap (HeapAlloc after forced garbage collections), its idle connections closed first.\n\n",
			m.callers, capSettle)
		fmt.Fprintf(&b, "| figure | before | idle | active | per idle caller | per active caller, beyond idle |\n|---|--:|--:|--:|--:|--:|\n")
		fmt.Fprintf(&b, "| Redis `used_memory` | %s | %s | %s | %s | %s |\n", fmtBytes(m.redis[0]), fmtBytes(m.redis[1]), fmtBytes(m.redis[2]), per(0, 1, m.redis), per(1, 2, m.redis))
		fmt.Fprintf(&b, "| instance live heap | %s | %s | %s | %s | %s |\n", fmtBytes(m.heap[0]), fmtBytes(m.heap[1]), fmtBytes(m.heap[2]), per(0, 1, m.heap), per(1, 2, m.heap))
		fmt.Fprintf(&b, "| instance RSS | %s | %s | %s | %s | %s |\n", fmtBytes(m.rss[0]), fmtBytes(m.rss[1]), fmtBytes(m.rss[2]), per(0, 1, m.rss), per(1, 2, m.rss))
		fmt.Fprintf(&b, "\nRedis' keys once the callers were active, by kind (`MEMORY USAGE`, every key; expiry from `PTTL`):\n\n"+
			"| key | keys | memory | per caller | expires in |\n|---|--:|--:|--:|---|\n")
		for _, k := range m.kinds {
			fmt.Fprintf(&b, "| `%s` | %d | %s | %.0f B | %s |\n", k.pattern, k.keys, fmtSize(k.bytes), k.perCaller, ttlText(k))
		}
	}
	b.WriteString(run.model())
	fmt.Fprintf(&b, "%s\n", capacityEnd)
	return b.Bytes()
}

// model is the capacity model's conclusions, the extrapolations marked.
func (run *capacityRun) model() string {
	exact := run.phase("chat")
	if exact == nil || exact.perRequest.cpu <= 0 {
		return ""
	}
	var b strings.Builder
	redisRate := 1e6 / exact.perRequest.cpu
	fmt.Fprintf(&b, "\nThe model, for small chats of a tier Redis decides on every request (`chat` above):\n\n")
	fmt.Fprintf(&b, "- Redis used %.1f µs of CPU per admitted request: one Redis core serves about **%s requests/s** "+
		"(*extrapolated*: 1 s ÷ that CPU, as if nothing but its CPU bound Redis, which runs commands on one thread).\n", exact.perRequest.cpu, roughly(redisRate))
	fmt.Fprintf(&b, "- One instance served %.0f requests/s here, using %s of CPU per request (on this machine's %d cores, beside the harness and Redis): "+
		"one Redis serves about **%.1f such instances** (*extrapolated*); an instance with a core to itself serves about %.0f requests/s "+
		"(*extrapolated*: 1 s ÷ its CPU per request), and one Redis about **%.1f** of those.\n",
		exact.rate(), fmtDur(float64(exact.caddyCPU)), run.machine.cores, redisRate/exact.rate(),
		1e9/float64(exact.caddyCPU), redisRate/(1e9/float64(exact.caddyCPU)))
	fmt.Fprintf(&b, "- At that rate Redis reads %.1f MB/s and writes %.1f MB/s (*extrapolated* from %.0f B in and %.0f B out per request).\n",
		redisRate*exact.perRequest.in/1e6, redisRate*exact.perRequest.out/1e6, exact.perRequest.in, exact.perRequest.out)
	if bg := run.background; bg.cpu > 0 {
		fmt.Fprintf(&b, "- Each instance costs Redis %.0f µs of CPU a second while idle (%.1f commands/s: heartbeats, polling the key store): "+
			"100 instances would take %.0f %% of a Redis core before any request (*extrapolated*).\n", bg.cpu, bg.total(), 100*bg.cpu*100/1e6)
	}
	if sliced := run.phase("chat, sliced"); sliced != nil && sliced.perRequest.cpu > 0 {
		fmt.Fprintf(&b, "- A tier whose limits are sliced costs Redis %.1f µs a request, %.0f× less: one Redis core, about %s requests/s of it (*extrapolated*; the instances, not Redis, bound such a fleet).\n",
			sliced.perRequest.cpu, exact.perRequest.cpu/sliced.perRequest.cpu, roughly(1e6/sliced.perRequest.cpu))
	}
	return b.String()
}

func (run *capacityRun) phase(name string) *capPhase {
	for _, p := range run.phases {
		if p.name == name {
			return p
		}
	}
	return nil
}

// roughly formats an extrapolation to two significant digits.
func roughly(x float64) string {
	if x < 100 {
		return fmt.Sprintf("%.0f", x)
	}
	scale := math.Pow(10, math.Floor(math.Log10(x))-1)
	return fmt.Sprintf("%.0f", math.Round(x/scale)*scale)
}

// fmtCalls formats commands per request; a dash for none.
func fmtCalls(n float64) string {
	switch {
	case n == 0:
		return "—"
	case n < 0.01:
		return "< 0.01"
	}
	return fmt.Sprintf("%.2f", n)
}

// ttlText says when a kind's keys expire.
func ttlText(k capKind) string {
	var parts []string
	if k.ttlLo >= 0 {
		if fmtTTL(k.ttlLo) == fmtTTL(k.ttlHi) {
			parts = append(parts, fmtTTL(k.ttlHi))
		} else {
			parts = append(parts, fmtTTL(k.ttlLo)+" to "+fmtTTL(k.ttlHi))
		}
	}
	if k.noTTL > 0 {
		parts = append(parts, fmt.Sprintf("never (%d)", k.noTTL))
	}
	return strings.Join(parts, "; ")
}

// fmtSize formats a size in bytes, KiB or MiB, whichever reads best.
func fmtSize(n int64) string {
	switch {
	case n < 1<<10:
		return fmt.Sprintf("%d B", n)
	case n < 1<<20:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmtBytes(n)
}

// fmtTTL formats an expiry in the largest unit that fits.
func fmtTTL(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%.0f days", d.Hours()/24)
	case d >= 2*time.Hour:
		return fmt.Sprintf("%.0f h", d.Hours())
	}
	return d.Round(time.Second).String()
}
