package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/freeport"
	"github.com/vigthoria/caddy-vigthoria/internal/pause"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// The upstream as the scarce resource: scenarios of a saturated upstream,
// each a Caddy with the module in front of a stand-in that enforces its
// own limits, under open-loop load (requests sent at their pace whatever
// the answers, as many independent clients send them). They measure what
// the queue and the pool of server keys promise: shares by weight
// between tiers, equal shares between the callers of a tier, no upstream
// 429 with upstream_limits, a revoked server key out and back, memory
// with many requests queued.
const (
	// upstreamRate is the requests a second the stand-in serves; past it,
	// it answers 429 as a real API does.
	upstreamRate = 100
	// scarceDemand is what the callers send in all, a second.
	scarceDemand = 300
	// scarceWarmup is sent before the counted window, so that the queue
	// is full and the shares steady when counting starts.
	scarceWarmup = 3 * time.Second
	// scarceWindow is the counted window of a shares scenario.
	scarceWindow = 10 * time.Second
	// scarceMaxWait is the queue's max_wait in the scenarios.
	scarceMaxWait = 2 * time.Second
	// freeCallers is the number of callers of the free tier; the first
	// sends heavyFactor times what each other sends.
	freeCallers = 10
	heavyFactor = 10
	// proCallers is the number of callers of the pro tier.
	proCallers = 5
	// queuedMany is the requests held in the queue at once for the
	// memory figure.
	queuedMany = 10000
)

// Markers of the scenarios' section in the report: `make bench` rewrites
// it after its load.
const (
	scarceBegin = "<!-- scarce -->"
	scarceEnd   = "<!-- /scarce -->"
)

// A loadCaller is one client of an open-loop load: a bearer key of a
// tier, sending at rate requests a second.
type loadCaller struct {
	tier string
	key  string
	rate float64
}

// An outcome is one request of an open-loop load as its caller saw it.
type outcome struct {
	caller int           // index into the load's callers
	sent   time.Duration // from the load's start
	status int           // 0: the connection failed
	code   string        // the error's code, for an error answer
	wait   time.Duration // the queue's wait, from X-Vigthoria-Queue-Wait
	retry  string        // Retry-After of a 429
	took   time.Duration // from sending to the answer's body read
}

// openLoop sends the callers' requests at their pace for warm+d, each
// request on its own goroutine, and returns every outcome once all were
// answered. urls are the instances to send to, taken in turn per
// caller.
func openLoop(ctx context.Context, client *http.Client, urls []string, callers []loadCaller, d time.Duration) []outcome {
	var mu sync.Mutex
	var outs []outcome
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range callers {
		wg.Go(func() {
			every := time.Duration(float64(time.Second) / c.rate)
			next := start.Add(time.Duration(i) * every / time.Duration(len(callers))) // spread the callers' phases
			for n := 0; ; n++ {
				if !sleepUntil(ctx, next) || next.Sub(start) >= d {
					return
				}
				sent := next.Sub(start)
				url := urls[(i+n)%len(urls)]
				wg.Go(func() {
					began := time.Now()
					o := send(ctx, client, url, c.key)
					o.caller, o.sent, o.took = i, sent, time.Since(began)
					mu.Lock()
					outs = append(outs, o)
					mu.Unlock()
				})
				next = next.Add(every)
			}
		})
	}
	wg.Wait()
	return outs
}

// send sends one small chat and says how it was answered.
func send(ctx context.Context, client *http.Client, url, key string) outcome {
	return sendBody(ctx, client, url, key, chatBody)
}

// sendBody sends one chat completion request of body and says how it was
// answered.
func sendBody(ctx context.Context, client *http.Client, url, key string, body []byte) outcome {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/v1/chat/completions", bytes.NewReader(body))
	if err != nil {
		return outcome{}
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	res, err := client.Do(req)
	if err != nil {
		return outcome{}
	}
	defer res.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	o := outcome{status: res.StatusCode, retry: res.Header.Get("Retry-After")}
	if ms, err := strconv.ParseInt(res.Header.Get("X-Vigthoria-Queue-Wait"), 10, 64); err == nil {
		o.wait = time.Duration(ms) * time.Millisecond
	}
	if res.StatusCode >= 400 {
		var e struct {
			Error struct{ Code string } `json:"error"`
		}
		_ = json.Unmarshal(answer, &e)
		o.code = e.Error.Code
	}
	return o
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	return pause.For(ctx, d)
}

// sharesLoad is the load of a shares scenario: scarceDemand a second,
// half from the pro callers, half from the free ones, of which the first
// sends heavyFactor times what each other does.
func sharesLoad(keys map[string][]string) []loadCaller {
	var callers []loadCaller
	for _, key := range keys["pro"][:proCallers] {
		callers = append(callers, loadCaller{tier: "pro", key: key, rate: scarceDemand / 2 / proCallers})
	}
	unit := float64(scarceDemand/2) / float64(freeCallers-1+heavyFactor)
	for i, key := range keys["free"][:freeCallers] {
		rate := unit
		if i == 0 {
			rate *= heavyFactor
		}
		callers = append(callers, loadCaller{tier: "free", key: key, rate: rate})
	}
	return callers
}

// shares is what a shares scenario saw in its counted window.
type shares struct {
	name        string
	about       string
	sent        int
	admitted    map[string]int // 200s by tier
	perCaller   []int          // 200s of each free caller, the heavy one first
	refused     map[string]int // the proxy's refusals by code
	failed      int            // other statuses and failed connections
	upstream    int            // requests the upstream answered in the window's span
	upstream429 int            // of them, its 429s
	waits       []time.Duration
	seconds     float64
}

func (s *shares) share(tier string) float64 {
	total := s.admitted["pro"] + s.admitted["free"]
	if total == 0 {
		return 0
	}
	return float64(s.admitted[tier]) / float64(total)
}

// fairness returns the smallest and largest share of a free caller, as
// fractions of an equal share.
func (s *shares) fairness() (lo, hi float64) {
	total := 0
	for _, n := range s.perCaller {
		total += n
	}
	if total == 0 {
		return 0, 0
	}
	equal := float64(total) / float64(len(s.perCaller))
	lo, hi = math.Inf(1), 0
	for _, n := range s.perCaller {
		lo, hi = min(lo, float64(n)/equal), max(hi, float64(n)/equal)
	}
	return lo, hi
}

// count tallies the outcomes sent in the counted window.
func count(name, about string, callers []loadCaller, outs []outcome) *shares {
	s := &shares{name: name, about: about, admitted: map[string]int{}, refused: map[string]int{},
		perCaller: make([]int, freeCallers), seconds: scarceWindow.Seconds()}
	firstFree := slices.IndexFunc(callers, func(c loadCaller) bool { return c.tier == "free" })
	for _, o := range outs {
		if o.sent < scarceWarmup {
			continue
		}
		s.sent++
		c := callers[o.caller]
		switch {
		case o.status == http.StatusOK:
			s.admitted[c.tier]++
			if c.tier == "free" {
				s.perCaller[o.caller-firstFree]++
			}
			s.waits = append(s.waits, o.wait)
		case o.status == http.StatusTooManyRequests && o.code != "upstream_rate_limited":
			s.refused[o.code]++
		case o.status == http.StatusTooManyRequests:
			s.refused[o.code]++
		default:
			s.failed++
		}
	}
	return s
}

// refusedText lists refusals by code, the most first.
func refusedText(m map[string]int) string {
	if len(m) == 0 {
		return "none"
	}
	codes := make([]string, 0, len(m))
	for c := range m {
		codes = append(codes, c)
	}
	sort.Slice(codes, func(i, j int) bool { return m[codes[i]] > m[codes[j]] })
	var parts []string
	for _, c := range codes {
		parts = append(parts, fmt.Sprintf("%d `%s`", m[c], c))
	}
	return strings.Join(parts, ", ")
}

// withSection returns doc with the section between begin and end
// replaced by section, or with section appended when doc has none.
func withSection(doc, section []byte, begin, end string) []byte {
	if b, e, ok := findSection(doc, begin, end); ok {
		return slices.Concat(doc[:b], section, doc[e:])
	}
	if len(doc) == 0 {
		return section
	}
	return slices.Concat(doc, []byte("\n"), section)
}

// findSection returns where doc's section between the markers is, the
// markers and the newline after them included.
func findSection(doc []byte, beginMark, endMark string) (begin, end int, ok bool) {
	begin = bytes.Index(doc, []byte(beginMark))
	if begin < 0 {
		return 0, 0, false
	}
	n := bytes.Index(doc[begin:], []byte(endMark))
	if n < 0 {
		return 0, 0, false
	}
	end = begin + n + len(endMark)
	if end < len(doc) && doc[end] == '\n' {
		end++
	}
	return begin, end, true
}

// scarceOnly runs the scenarios alone and rewrites their section of
// cfg.out.
func scarceOnly(ctx context.Context, cfg config) error {
	s, err := runScarce(ctx, cfg)
	if err != nil {
		return err
	}
	old, err := os.ReadFile(cfg.out)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	if err := os.WriteFile(cfg.out, withSection(old, s.markdown(), scarceBegin, scarceEnd), 0o644); err != nil {
		return err
	}
	fmt.Printf("scarce: wrote its section of %s\n", cfg.out)
	return nil
}

// scarceData fills the scenarios' Caddyfile.
type scarceData struct {
	siteData
	Keys   string // the api_key or api_keys lines
	Queue  string // the queue option's arguments
	Limits string // the upstream_limits block's lines; none when empty
}

// scarceSite is the module with two tiers of weights 3 and 1 that queue
// for the upstream up to scarceMaxWait, and no limits of their own that
// the load reaches.
const scarceSite = `
http://127.0.0.1:{{.Port}} {
	bind 127.0.0.1
	vigthoria {
		upstream {{.Upstream}}/v1
{{.Keys}}
		store {{.Store}}
		queue {{.Queue}}
{{- if .Limits}}
		upstream_limits {
{{.Limits}}
		}
{{- end}}
		tier pro {
			weight 3
			requests 1000000/1m
		}
		tier free {
			weight 1
			requests 1000000/1m
		}
	}
}
`

// scarceKeys names the client keys of the scenarios.
func scarceKeys(f func(tier string, i int) error) error {
	for i := range proCallers {
		if err := f("pro", i); err != nil {
			return err
		}
	}
	for i := range freeCallers {
		if err := f("free", i); err != nil {
			return err
		}
	}
	return nil
}

// keysOf is the client keys that each names, the i-th key of a tier
// named bench-<tier>-<i>.
func keysOf(each func(f func(tier string, i int) error) error) []wantedKey {
	var want []wantedKey
	each(func(tier string, i int) error {
		want = append(want, wantedKey{as: tier, attrs: keys.Attrs{Name: fmt.Sprintf("bench-%s-%d", tier, i), Tier: tier}})
		return nil
	})
	return want
}

// oneKey is the server key of the scenarios but the pool's.
const oneKey = "\t\tapi_key {env.VIGTHORIA_API_KEY}"

// startScarce starts n instances of the scenarios' site on one store
// (Redis when redisURL is set, else each its own SQLite), in front of up.
func startScarce(ctx context.Context, bin, dir string, up *limitedUpstream, d scarceData, n int, redisURL string) ([]*instance, error) {
	return startSites(ctx, bin, dir, up, scarceSite, scarceKeys, "pro", d, n, redisURL)
}

// startSites starts n instances of site, a template of scarceData, on one
// store (Redis when redisURL is set, else each its own SQLite), in front
// of up, with the client keys that each names. Each is ready once a key
// of readyTier gets GET /v1/models.
func startSites(ctx context.Context, bin, dir string, up *limitedUpstream, site string, each func(f func(tier string, i int) error) error,
	readyTier string, d scarceData, n int, redisURL string) ([]*instance, error) {
	var insts []*instance
	var keys map[string][]string
	for i := range n {
		data := d
		data.Upstream = up.url
		data.Dir = filepath.Join(dir, fmt.Sprintf("scarce-%d", i))
		if err := os.MkdirAll(data.Dir, 0o700); err != nil {
			return insts, err
		}
		var err error
		if data.Port, err = freeport.Take(); err != nil {
			return insts, err
		}
		if data.AdminPort, err = freeport.Take(); err != nil {
			return insts, err
		}
		spec := "sqlite:{{.Dir}}/vigthoria.db"
		if redisURL != "" {
			spec, data.Redis = "{{.Redis}}", redisURL
		}
		if i == 0 || redisURL == "" {
			if keys, data.Store, err = clientKeys(ctx, spec, data.siteData, keysOf(each)); err != nil {
				return insts, err
			}
		} else {
			data.Store = insts[0].store
		}
		caddyfile, err := render(globalOptions+site, data)
		if err != nil {
			return insts, err
		}
		inst := &instance{target: target{name: fmt.Sprintf("scarce-%d", i), store: data.Store}, keys: keys, client: newClient(),
			url: fmt.Sprintf("http://127.0.0.1:%d", data.Port)}
		env := append(up.env(), "XDG_DATA_HOME="+filepath.Join(data.Dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(data.Dir, "config"))
		if inst.caddy, err = startCaddy(bin, data.Dir, caddyfile, env, data.AdminPort); err != nil {
			return insts, err
		}
		insts = append(insts, inst)
		if err := inst.caddy.waitReady(ctx, inst.client, inst.url+"/v1/models", keys[readyTier][0]); err != nil {
			return insts, err
		}
	}
	return insts, nil
}

// runShares runs one shares scenario on n instances.
func runShares(ctx context.Context, cfg config, dir, name, about string, limits bool, n int, redisURL string) (*shares, error) {
	up, err := startLimitedUpstream(upstreamRate, false)
	if err != nil {
		return nil, err
	}
	defer up.close()
	d := scarceData{Keys: oneKey, Queue: "2s length 2000"}
	if limits {
		d.Limits = fmt.Sprintf("\t\t\trequests %d/1s burst %d", upstreamRate, upstreamBurst)
	}
	insts, err := startScarce(ctx, cfg.caddy, filepath.Join(dir, name), up, d, n, redisURL)
	defer stopAll(insts)
	if err != nil {
		return nil, err
	}
	callers := sharesLoad(insts[0].keys)
	urls := make([]string, len(insts))
	for i, inst := range insts {
		urls[i] = inst.url
	}
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 4096, DisableCompression: true}}
	defer client.CloseIdleConnections()
	outs := openLoop(ctx, client, urls, callers, scarceWarmup+scarceWindow)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	s := count(name, about, callers, outs)
	s.upstream, s.upstream429 = up.Count(), up.Refused429()
	fmt.Printf("scarce: %s: pro %.1f%%, free %.1f%%, upstream 429s %d\n", name, 100*s.share("pro"), 100*s.share("free"), s.upstream429)
	return s, nil
}

// queued is what the memory scenario saw: the proxy's RSS idle and with
// queuedMany requests waiting in its queue, and after they left.
type queued struct {
	held             int // requests in the queue at the peak, by the metric
	idle, full, left int64
	// The live heap (after a collection) idle, full and once they left:
	// what the process holds, apart from what the runtime keeps of the
	// RSS for later.
	heapIdle, heapFull, heapLeft int64
	goroutinesIdle               int
	goroutinesLeft               int
}

// runQueued holds queuedMany requests in the queue, behind one upstream
// call that takes its time, and measures the proxy's memory.
func runQueued(ctx context.Context, cfg config, dir string) (*queued, error) {
	up, err := startLimitedUpstream(0, false)
	if err != nil {
		return nil, err
	}
	defer up.close()
	d := scarceData{Keys: oneKey, Queue: fmt.Sprintf("60s length %d per_caller %d", queuedMany, queuedMany/freeCallers), Limits: "\t\t\tconcurrent 1"}
	insts, err := startScarce(ctx, cfg.caddy, filepath.Join(dir, "queued"), up, d, 1, "")
	defer stopAll(insts)
	if err != nil {
		return nil, err
	}
	inst := insts[0]
	adm := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	q := &queued{}
	closeIdle(inst, up.srv)
	time.Sleep(time.Second)
	base, err := inst.caddy.figures(ctx, adm)
	if err != nil {
		return nil, err
	}
	q.idle, q.goroutinesIdle = base.rss, base.goroutines
	if q.heapIdle, err = liveHeap(ctx, adm, inst.caddy.adminURL); err != nil {
		return nil, err
	}

	up.SetBehavior(standin.Behavior{Latency: time.Minute}) // the one call admitted holds the upstream's only slot
	loadCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: queuedMany + 1, DisableCompression: true}}
	var wg sync.WaitGroup
	var mu sync.Mutex
	answered := map[string]int{}
	free := inst.keys["free"]
	for i := range queuedMany + 1 {
		wg.Go(func() {
			o := send(loadCtx, client, inst.url, free[i%len(free)])
			if loadCtx.Err() == nil {
				mu.Lock()
				answered[fmt.Sprintf("%d %s", o.status, o.code)]++
				mu.Unlock()
			}
		})
		if i == 0 {
			time.Sleep(100 * time.Millisecond) // the first takes the slot
		}
	}
	deadline := time.Now().Add(time.Minute)
	for q.held < queuedMany && time.Now().Before(deadline) {
		if !pause.For(ctx, 250*time.Millisecond) {
			return nil, ctx.Err()
		}
		if q.held, err = queueLength(ctx, adm, inst.caddy.adminURL); err != nil {
			return nil, err
		}
	}
	full, err := inst.caddy.figures(ctx, adm)
	if err != nil {
		return nil, err
	}
	q.full = full.rss
	if q.heapFull, err = liveHeap(ctx, adm, inst.caddy.adminURL); err != nil {
		return nil, err
	}
	mu.Lock()
	if len(answered) > 0 {
		fmt.Printf("scarce: answered while the others were queued: %v\n", answered)
	}
	mu.Unlock()
	cancel()
	wg.Wait()
	client.CloseIdleConnections()
	up.SetBehavior(standin.Behavior{})
	after, err := drain(ctx, inst, func() { closeIdle(inst, up.srv) }, adm, base)
	if err != nil {
		return nil, err
	}
	q.left, q.goroutinesLeft = after.rss, after.goroutines
	if q.heapLeft, err = liveHeap(ctx, adm, inst.caddy.adminURL); err != nil {
		return nil, err
	}
	fmt.Printf("scarce: %d queued: RSS %s idle, %s queued, %s after\n", q.held, fmtBytes(q.idle), fmtBytes(q.full), fmtBytes(q.left))
	return q, nil
}

// queueLength reads the requests queued in every tier from the proxy's
// metrics.
func queueLength(ctx context.Context, adm *http.Client, adminURL string) (int, error) {
	body, err := adminGet(ctx, adm, adminURL+"/metrics", 8<<20)
	if err != nil {
		return 0, err
	}
	n := 0.0
	for line := range strings.Lines(string(body)) {
		if rest, ok := strings.CutPrefix(line, "vigthoria_queue_length{"); ok {
			if i := strings.LastIndexByte(rest, ' '); i >= 0 {
				v, _ := strconv.ParseFloat(strings.TrimSpace(rest[i+1:]), 64)
				n += v
			}
		}
	}
	return int(n), nil
}

// limitedUpstream is a stand-in of the scenarios' own, enforcing rate
// requests a second (none when 0), taking poolKeys more server keys, and
// counting the requests of each.
type limitedUpstream struct {
	*standin.Server
	url  string
	key  string   // the server key
	more []string // the pool's other keys
	srv  *http.Server
}

// poolKeys is the number of server keys of the pool scenario.
const poolKeys = 3

func startLimitedUpstream(rate int, record bool) (*limitedUpstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the stand-in upstream: %w", err)
	}
	up := &limitedUpstream{url: "http://" + ln.Addr().String(), key: "bench-server-" + rand.Text()}
	accounts := map[string][]string{}
	for range poolKeys - 1 {
		k := "bench-server-" + rand.Text()
		up.more = append(up.more, k)
		accounts[k] = nil
	}
	opts := standin.Options{APIKey: up.key, NoRecord: !record, RateLimit: 1e12, Accounts: accounts, CountKeys: true}
	if rate > 0 {
		opts.Enforce = standin.Enforce{Requests: rate, Window: time.Second}
	}
	up.Server = standin.New(opts)
	up.srv = &http.Server{Handler: up.Server, ReadHeaderTimeout: 10 * time.Second}
	go up.srv.Serve(ln)
	return up, nil
}

// env gives Caddy the server keys: VIGTHORIA_API_KEY, and the pool's
// VIGTHORIA_KEY_A, _B, _C.
func (up *limitedUpstream) env() []string {
	env := []string{"VIGTHORIA_API_KEY=" + up.key}
	for i, k := range up.all() {
		env = append(env, fmt.Sprintf("VIGTHORIA_KEY_%c=%s", 'A'+i, k))
	}
	return env
}

func (up *limitedUpstream) all() []string { return append([]string{up.key}, up.more...) }

func (up *limitedUpstream) close() { up.srv.Close() }

// upstreamBurst is the burst of the upstream_limits of the shares
// scenarios: the stand-in's bucket holds upstreamRate, the proxy's less,
// so that requests admitted in a burst and arriving a little apart never
// find the stand-in's bucket empty.
const upstreamBurst = 10

// scarceRun is what the scenarios saw.
type scarceRun struct {
	began   time.Time
	machine machine
	shares  []*shares
	pool    *pool
	queued  *queued
}

// runScarce runs every scenario, each on processes of its own.
func runScarce(ctx context.Context, cfg config) (*scarceRun, error) {
	s := &scarceRun{began: time.Now()}
	m, dir, err := scenarioStart(cfg, "vigthoria-scarce-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	s.machine = m
	redis, err := redistest.Run(dir)
	if err != nil {
		return nil, err
	}
	defer redis.Stop()
	for _, sc := range []struct {
		name, about string
		limits      bool
		n           int
		redis       string
	}{
		{"upstream_limits", "`upstream_limits { requests 100/1s burst 10 }`: the proxy sends no more than the upstream serves", true, 1, ""},
		{"learned", "no `upstream_limits`: the queue waits out the upstream's own 429s (their `Retry-After`), as the proxy learns them", false, 1, ""},
		{"fleet", "`upstream_limits` as above, on two instances sharing one redis-server; each caller's requests alternate between the instances", true, 2, redis.URL},
	} {
		fmt.Printf("scarce: shares, %s\n", sc.name)
		sh, err := runShares(ctx, cfg, dir, sc.name, sc.about, sc.limits, sc.n, sc.redis)
		if err != nil {
			return nil, fmt.Errorf("shares, %s: %w", sc.name, err)
		}
		s.shares = append(s.shares, sh)
	}
	fmt.Println("scarce: pool of server keys")
	if s.pool, err = runPool(ctx, cfg, dir); err != nil {
		return nil, fmt.Errorf("pool: %w", err)
	}
	fmt.Printf("scarce: %d requests queued\n", queuedMany)
	if s.queued, err = runQueued(ctx, cfg, dir); err != nil {
		return nil, fmt.Errorf("queued: %w", err)
	}
	return s, nil
}

// markdown renders the scenarios' section of the report, markers included.
func (s *scarceRun) markdown() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\n## The upstream as the scarce resource\n\n", scarceBegin)
	fmt.Fprintf(&b, "Run on %s, %d cores, load average %s when it began. "+
		"Each scenario is a Caddy with this module in front of a stand-in upstream of its own, under open-loop load "+
		"(each request sent at its time, whatever the answers before it). "+
		"Shares: the stand-in serves %d requests/s (a token bucket of %d, past it a 429 with `Retry-After`); "+
		"the callers send %d/s, half from %d callers of tier `pro` (`weight 3`), half from %d callers of tier `free` (`weight 1`), "+
		"the first of which sends %d× what each other does; `queue 2s length 2000`. Counted over %v after %v of warm-up.\n\n",
		s.began.UTC().Format("2006-01-02 15:04 MST"), s.machine.cores, s.machine.loadAverage,
		upstreamRate, upstreamRate, scarceDemand, proCallers, freeCallers, heavyFactor, scarceWindow, scarceWarmup)
	fmt.Fprintf(&b, "| scenario | admitted/s | pro's share (goal 75 %% ± 5) | free callers, least and most of an equal share (goal ± 20 %%) | upstream 429s (goal 0 with `upstream_limits`) | queue wait of the admitted, p50 / p99 | refused by the proxy |\n|---|---|---|---|---|---|---|\n")
	for _, sh := range s.shares {
		lo, hi := sh.fairness()
		admitted := sh.admitted["pro"] + sh.admitted["free"]
		fmt.Fprintf(&b, "| `%s` | %.0f | %.1f %% %s | %.2f – %.2f %s | %d of %d | %s / %s | %s |\n",
			sh.name, float64(admitted)/sh.seconds,
			100*sh.share("pro"), mark(math.Abs(sh.share("pro")-0.75) <= 0.05),
			lo, hi, mark(lo >= 0.8 && hi <= 1.2),
			sh.upstream429, sh.upstream,
			fmtDur(float64(quantile(sh.waits, 0.5))), fmtDur(float64(quantile(sh.waits, 0.99))),
			refusedText(sh.refused))
	}
	b.WriteString("\n")
	for _, sh := range s.shares {
		fmt.Fprintf(&b, "- `%s`: %s.", sh.name, sh.about)
		if sh.failed > 0 {
			fmt.Fprintf(&b, " %d answers were neither 200 nor a 429.", sh.failed)
		}
		b.WriteString("\n")
	}
	if p := s.pool; p != nil {
		fmt.Fprintf(&b, "\nPool: three server keys of weights %v (`probe_every 1s`), chats at %d/s from %d `pro` callers for %v; "+
			"the third key is revoked at the stand-in at %v and restored at %v.\n\n", poolWeights, poolRate, proCallers, poolEnd, poolRevoke, poolRestore)
		fmt.Fprintf(&b, "| figure | this run | goal |\n|---|---|---|\n")
		fmt.Fprintf(&b, "| callers' answers | %s | every one 200 %s |\n", statusText(p.answers), mark(len(p.answers) == 1 && p.answers[http.StatusOK] > 0))
		fmt.Fprintf(&b, "| requests per key before the revocation | %s | by weight ± 10 %% %s |\n", spreadText(p.before), mark(spreadOK(p.before)))
		fmt.Fprintf(&b, "| chats sent with the revoked key while revoked | %d (and %d probes) | 1 %s |\n", p.revoked, p.probes, mark(p.revoked <= 1))
		fmt.Fprintf(&b, "| from the restore to its first chat | %s | within one probe (1 s) %s |\n", fmtDur(float64(p.back)), mark(p.back > 0 && p.back <= 1500*time.Millisecond))
		fmt.Fprintf(&b, "| requests per key after the restore | %s | by weight ± 10 %% %s |\n", spreadText(p.after), mark(spreadOK(p.after)))
	}
	if q := s.queued; q != nil {
		per := float64(q.full-q.idle) / float64(max(q.held, 1))
		fmt.Fprintf(&b, "\nMemory: %d requests held in the queue at once (`upstream_limits { concurrent 1 }` and one upstream call that takes a minute), %d of them by the queue's metric: "+
			"RSS %s idle, %s with them queued (%s a queued request, its connection and goroutine included), %s once they left; "+
			"live heap %s idle, %s queued, %s once they left; goroutines %d idle, %d after.\n",
			queuedMany, q.held, fmtBytes(q.idle), fmtBytes(q.full), fmt.Sprintf("%.0f KiB", per/(1<<10)), fmtBytes(q.left),
			fmtBytes(q.heapIdle), fmtBytes(q.heapFull), fmtBytes(q.heapLeft), q.goroutinesIdle, q.goroutinesLeft)
	}
	fmt.Fprintf(&b, "%s\n", scarceEnd)
	return b.Bytes()
}

func mark(ok bool) string {
	if ok {
		return "✅"
	}
	return "❌"
}

func statusText(m map[int]int) string {
	var parts []string
	for _, st := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%d × %d", m[st], st))
	}
	return strings.Join(parts, ", ")
}

// spreadText shows requests per key with their shares.
func spreadText(n []int) string {
	total := 0
	for _, v := range n {
		total += v
	}
	var parts []string
	for _, v := range n {
		parts = append(parts, fmt.Sprintf("%d (%.0f %%)", v, 100*float64(v)/float64(max(total, 1))))
	}
	return strings.Join(parts, ", ")
}

// spreadOK reports whether each key's share is within 10 % of its
// weight's.
func spreadOK(n []int) bool {
	total, weights := 0, 0
	for i, v := range n {
		total += v
		weights += poolWeights[i]
	}
	for i, v := range n {
		want := float64(total) * float64(poolWeights[i]) / float64(weights)
		if math.Abs(float64(v)-want) > 0.1*want {
			return false
		}
	}
	return total > 0
}

// poolSite's server keys: three, of weights 1, 1 and 2, probed once a
// second when refused.
const poolSite = `		api_keys {
			{env.VIGTHORIA_KEY_A} name a
			{env.VIGTHORIA_KEY_B} name b
			{env.VIGTHORIA_KEY_C} name c weight 2
			probe_every 1s
		}`

// poolWeights are poolSite's weights, in its order.
var poolWeights = []int{1, 1, 2}

// Phases of the pool scenario: the third key is revoked at poolRevoke
// and restored at poolRestore; the load ends at poolEnd.
const (
	poolRevoke  = 4 * time.Second
	poolRestore = 8 * time.Second
	poolEnd     = 12 * time.Second
	poolRate    = 150 // requests a second, from the pro callers
)

// pool is what the pool scenario saw.
type pool struct {
	before, after []int         // chats of each key before the revocation and after the restore
	answers       map[int]int   // what the callers got, by status
	revoked       int           // chats sent with the revoked key while it was revoked
	probes        int           // other requests (probes) sent with it meanwhile
	back          time.Duration // from the restore to the revoked key's first chat
}

// runPool sends chats through a pool of three server keys and revokes
// one of them at the upstream for a while.
func runPool(ctx context.Context, cfg config, dir string) (*pool, error) {
	up, err := startLimitedUpstream(0, true)
	if err != nil {
		return nil, err
	}
	defer up.close()
	insts, err := startScarce(ctx, cfg.caddy, filepath.Join(dir, "pool"), up, scarceData{Keys: poolSite, Queue: "off"}, 1, "")
	defer stopAll(insts)
	if err != nil {
		return nil, err
	}
	var callers []loadCaller
	for _, key := range insts[0].keys["pro"][:proCallers] {
		callers = append(callers, loadCaller{tier: "pro", key: key, rate: poolRate / proCallers})
	}
	keys := up.all()
	bad := keys[2]
	up.Reset()
	start := time.Now()
	var revokedAt, restoredAt time.Time
	var phases sync.WaitGroup
	phases.Go(func() {
		if sleepUntil(ctx, start.Add(poolRevoke)) {
			revokedAt = time.Now()
			up.Revoke(bad)
		}
		if sleepUntil(ctx, start.Add(poolRestore)) {
			restoredAt = time.Now()
			up.Restore(bad)
		}
	})
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 1024, DisableCompression: true}}
	defer client.CloseIdleConnections()
	outs := openLoop(ctx, client, []string{insts[0].url}, callers, poolEnd)
	phases.Wait()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	p := &pool{before: make([]int, len(keys)), after: make([]int, len(keys)), answers: map[int]int{}}
	for _, o := range outs {
		p.answers[o.status]++
	}
	for _, r := range up.Requests() {
		i := slices.Index(keys, strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "))
		chat := strings.HasSuffix(r.Path, "/chat/completions")
		switch {
		case i < 0:
		case r.At.Before(revokedAt):
			if chat {
				p.before[i]++
			}
		case r.At.Before(restoredAt):
			if i == 2 && chat {
				p.revoked++
			} else if i == 2 {
				p.probes++
			}
		case chat:
			if i == 2 && p.back == 0 {
				p.back = r.At.Sub(restoredAt)
			}
			p.after[i]++
		}
	}
	fmt.Printf("scarce: pool: before %v, after %v, answers %v, revoked key: %d chats, %d probes, back after %v\n",
		p.before, p.after, p.answers, p.revoked, p.probes, p.back)
	return p, nil
}
