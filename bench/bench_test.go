package main

import (
	"math"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestAllocsPerOp(t *testing.T) {
	const output = `pkg: github.com/vigthoria/caddy-vigthoria/limiter
BenchmarkFailureThrottleBlocked-2   	29573274	        34.42 ns/op	       0 B/op	       0 allocs/op
BenchmarkMemoryAdmitSettle-2        	 1037860	      1404 ns/op	       119.8 bytes/client	      16 B/op	       1 allocs/op
BenchmarkMemoryAdmitSettleMore      	 1037860	      1404 ns/op	       3 allocs/op
`
	cases := []struct {
		name   string
		want   float64
		wantOK bool
	}{
		{"BenchmarkMemoryAdmitSettle", 1, true},
		{"BenchmarkFailureThrottleBlocked", 0, true},
		{"BenchmarkMemoryAdmitSettleMore", 3, true}, // GOMAXPROCS=1: no suffix
		{"BenchmarkMissing", 0, false},
	}
	for _, tc := range cases {
		if got, ok := allocsPerOp(output, tc.name); got != tc.want || ok != tc.wantOK {
			t.Errorf("allocsPerOp(%s) = %v, %v; want %v, %v", tc.name, got, ok, tc.want, tc.wantOK)
		}
	}
}

func TestQuantileAndMedian(t *testing.T) {
	ds := make([]time.Duration, 100)
	for i := range ds {
		ds[i] = time.Duration(100-i) * time.Millisecond
	}
	if got := quantile(ds, 0.50); got != 50*time.Millisecond {
		t.Errorf("p50 of 1..100 ms = %v, want 50ms", got)
	}
	if got := quantile(ds, 0.99); got != 99*time.Millisecond {
		t.Errorf("p99 of 1..100 ms = %v, want 99ms", got)
	}
	if got := quantile(nil, 0.5); got != 0 {
		t.Errorf("p50 of nothing = %v, want 0", got)
	}
	if got, ok := median([]float64{3, 1, 2}); got != 2 || !ok {
		t.Errorf("median(3 1 2) = %v, %v; want 2, true", got, ok)
	}
	if got, ok := median([]float64{4, 1, 2, 3}); got != 2.5 || !ok {
		t.Errorf("median(4 1 2 3) = %v, %v; want 2.5, true", got, ok)
	}
	if _, ok := median(nil); ok {
		t.Error("median of nothing is ok, want not")
	}
}

func TestRatioPairsRounds(t *testing.T) {
	r := results{
		{"w", "a"}: {{rate: 90}, {rate: 50}, {rate: 200}},
		{"w", "b"}: {{rate: 100}, {rate: 100}, {rate: 400}},
	}
	// Per round 0.9, 0.5, 0.5: the median is 0.5, where the ratio of
	// the medians would be 0.9.
	if got, _ := r.ratio("w", "a", "b", byRate); got != 0.5 {
		t.Errorf("ratio = %v, want 0.5", got)
	}
	if got, _ := r.diff("w", "a", "b", byRate); got != -50 {
		t.Errorf("diff = %v, want -50", got)
	}
	if _, ok := r.ratio("w", "a", "missing", byRate); ok {
		t.Error("ratio against a missing target is ok, want not")
	}
}

func TestParseCPUTime(t *testing.T) {
	stat := []byte("4242 (caddy (worker)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 37 0 0 20 0 12 0 1000 2000000 5000 18446744073709551615\n")
	got, err := parseCPUTime(stat)
	if err != nil || got != 2870*time.Millisecond {
		t.Errorf("parseCPUTime = %v, %v; want 2.87s (287 ticks)", got, err)
	}
	if _, err := parseCPUTime([]byte("4242 (caddy) S 1")); err == nil {
		t.Error("a short line parsed")
	}
}

// Each feature of the module's site is in its Caddyfile only when the
// target turns it on.
func TestModuleSiteFeatures(t *testing.T) {
	cases := []struct {
		name      string
		f         features
		want, not []string
	}{
		{"bare", features{}, []string{"api_key {env.VIGTHORIA_API_KEY}", "tier bench {"},
			[]string{"api_keys", "budget", "prices", "alerts", "queue", "vigthoria_dashboard", "jwt", "max_token_ttl", "tier pro"}},
		{"deployed", deployed, []string{"budget 10000/month", "prices {", "webhook http://hooks/alerts", "secret {env.VIGTHORIA_WEBHOOK_SECRET}",
			"queue 10s", "http://127.0.0.1:8081 {", "operator $2a$10$hash", "vigthoria_dashboard {\n\t\tstore sqlite /tmp/v.db", "jwt http://issuer {", "max_token_ttl 24h", "tier pro {"},
			[]string{"api_keys", "upstream_limits"}},
		{"pool", features{Pool: true}, []string{"api_keys {", "upstream_limits {"}, []string{"api_key {env"}},
	}
	for _, tc := range cases {
		data := siteData{Port: 8080, DashboardPort: 8081, Upstream: "http://up", Store: "sqlite /tmp/v.db", Issuer: "http://issuer",
			Webhook: "http://hooks/alerts", OperatorHash: "$2a$10$hash", features: tc.f}
		site, err := render(moduleSite, data)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		for _, s := range tc.want {
			if !strings.Contains(site, s) {
				t.Errorf("%s: no %q in\n%s", tc.name, s, site)
			}
		}
		for _, s := range tc.not {
			if strings.Contains(site, s) {
				t.Errorf("%s: %q in\n%s", tc.name, s, site)
			}
		}
	}
}

// A goal of throughput and CPU per request fails on either.
func TestWithCPU(t *testing.T) {
	plain := []sample{{rate: 100, cpuPerReq: 50e3}, {rate: 100, cpuPerReq: 50e3}, {rate: 100, cpuPerReq: 50e3}}
	cases := []struct {
		name     string
		mod      []sample
		wantMet  bool
		wantNote string
	}{
		{"both within", []sample{{rate: 96, cpuPerReq: 52e3}, {rate: 97, cpuPerReq: 52e3}, {rate: 95, cpuPerReq: 52e3}}, true, ""},
		{"CPU above", []sample{{rate: 96, cpuPerReq: 55e3}, {rate: 97, cpuPerReq: 55e3}, {rate: 95, cpuPerReq: 55e3}}, false, "CPU per request above 1.05×"},
		{"throughput below", []sample{{rate: 90, cpuPerReq: 52e3}, {rate: 90, cpuPerReq: 52e3}, {rate: 90, cpuPerReq: 52e3}}, false, ""},
		{"both", []sample{{rate: 90, cpuPerReq: 60e3}, {rate: 90, cpuPerReq: 60e3}, {rate: 90, cpuPerReq: 60e3}}, false, "throughput, and CPU per request above 1.05×"},
	}
	for _, tc := range cases {
		r := &report{results: results{{chatWorkload, moduleName}: tc.mod, {chatWorkload, caddyName}: plain}}
		v := goals[0].check(r)
		if !v.measured || v.met != tc.wantMet || v.note != tc.wantNote {
			t.Errorf("%s: measured %v, met %v, note %q; want true, %v, %q (%s)", tc.name, v.measured, v.met, v.note, tc.wantMet, tc.wantNote, v.figure)
		}
	}
}

// The ladder climbs from the bare module to what the load's module
// targets turn on, each rung compared with one measured before it, and
// its added CPU, read against plain Caddy of the same round, adds up to
// the top rung's ratio to plain Caddy less one, in plain Caddy's µs.
func TestLadder(t *testing.T) {
	rungs := ladder()
	seen := map[string]bool{}
	var climbing []rung // from the bare rung, each compared with the rung just before it
	climbs := true
	for i, r := range rungs {
		if seen[r.name] {
			t.Errorf("rung %s twice", r.name)
		}
		if r.before != "" && !seen[r.before] {
			t.Errorf("rung %s compared with %s, not measured before it", r.name, r.before)
		}
		seen[r.name] = true
		if i > 0 && climbs {
			if climbs = r.before == rungs[i-1].name; climbs {
				climbing = append(climbing, r)
			}
		}
	}
	top := climbing[len(climbing)-1]
	want := with(deployed, func(f *features) { f.Pool, f.JWT, f.Minting, f.MixTiers = true, false, false, false })
	if top.features != want {
		t.Errorf("the ladder's top rung %s has %+v, want the deployed features and the pool, %+v", top.name, top.features, want)
	}

	// The machine drifts between rounds: plain Caddy's CPU per request
	// doubles in the second, and every rung's with it. Each rung costs
	// 1 % of plain Caddy more than the one before, in every round.
	plain := []float64{50e3, 100e3, 60e3}
	fr := &featuresRun{rungs: rungs, results: results{}}
	for i, r := range rungs {
		var ss []sample
		for _, p := range plain {
			cpu := p
			if r.name != caddyName {
				cpu = p * (1 + float64(i)/100)
			}
			ss = append(ss, sample{rate: 1, cpuPerReq: cpu})
		}
		fr.results[resultKey{chatWorkload, r.name}] = ss
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-6 }
	var sum float64
	for _, r := range climbing {
		added, _, ok := fr.added(r)
		if !ok {
			t.Fatalf("rung %s: nothing added", r.name)
		}
		if r.before != caddyName && !near(added, 600) { // 1 % of plain Caddy's median, 60 µs
			t.Errorf("rung %s adds %v ns, want 600", r.name, added)
		}
		sum += added
	}
	topRatio, _ := fr.cpuRatio(top.name)
	if want := (topRatio - 1) * 60e3; !near(sum, want) {
		t.Errorf("added CPU sums to %v, want %v", sum, want)
	}
}

func TestBurstVerdict(t *testing.T) {
	exact := func() *burstShot {
		return &burstShot{answers: map[int]int{200: burstLimit, 429: burstParallel - burstLimit}, upstream: burstLimit,
			steady: []time.Duration{3 * time.Millisecond}}
	}
	leaked := exact()
	leaked.upstream++ // the upstream saw a request the fleet refused
	overAdmitted := exact()
	overAdmitted.answers[200]++
	overAdmitted.answers[429]--
	overAdmitted.upstream++
	slow := exact()
	slow.steady = []time.Duration{5 * time.Millisecond}
	unloaded := []time.Duration{2 * time.Millisecond, time.Millisecond}
	cases := []struct {
		name  string
		shots []*burstShot
		met   bool
	}{
		{"exact, p99 1.5x", []*burstShot{exact(), exact()}, true},
		{"the upstream got one more than admitted", []*burstShot{exact(), leaked}, false},
		{"one admitted past the limit", []*burstShot{overAdmitted}, false},
		{"p99 2.5x", []*burstShot{exact(), slow}, false},
	}
	for _, tc := range cases {
		v := (&burstRun{burstLoads: burstLoads{unloaded: unloaded, shots: tc.shots}}).verdict()
		if !v.measured || v.met != tc.met {
			t.Errorf("%s: verdict %v (%s), want met %v", tc.name, v, v.figure, tc.met)
		}
	}
	if v := (*burstRun)(nil).verdict(); v.measured {
		t.Errorf("a burst not run is measured: %v", v)
	}

	// The floors are told beside the module's ratio, and do not change
	// the verdict.
	floor := exact()
	floor.steady = []time.Duration{40 * time.Millisecond}
	r := &burstRun{burstLoads: burstLoads{unloaded: unloaded, shots: []*burstShot{exact()}},
		floors: []*burstLoads{{unloaded: unloaded, shots: []*burstShot{floor}}}}
	v := r.verdict()
	if want := "; the same loads: 20.00× " + burstFloors[0].about; !v.met || !strings.HasSuffix(v.figure, want) {
		t.Errorf("with a floor: verdict %v (%s), want met, ending %q", v, v.figure, want)
	}
}

func TestParseInfo(t *testing.T) {
	const info = "# Commandstats\r\ncmdstat_evalsha:calls=30,usec=900,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_hmget:calls=12,usec=24,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\r\n# Stats\r\n" +
		"total_net_input_bytes:5000\r\ntotal_net_output_bytes:700\r\n\r\n# CPU\r\nused_cpu_sys:1.250000\r\nused_cpu_user:0.750000\r\n\r\n" +
		"# Memory\r\nused_memory:1048576\r\n"
	s, err := parseInfo(info)
	if err != nil {
		t.Fatal(err)
	}
	if s.calls["evalsha"] != 30 || s.calls["hmget"] != 12 || s.in != 5000 || s.out != 700 || s.cpu != 2e6 || s.scripts != 900 || s.memory != 1<<20 || s.reply != len(info) {
		t.Errorf("parseInfo = %+v", s)
	}
	if _, err := parseInfo("# Stats\r\ntotal_net_input_bytes:5000\r\n"); err == nil {
		t.Error("INFO without its CPU and memory parsed")
	}
	later := redisStats{calls: map[string]float64{"evalsha": 40, "hmget": 12, "info": 1}, in: 5100 + float64(infoCommandLen()), out: 700 + float64(len(info)) + 50, cpu: 2.5e6}
	u := later.since(s)
	if u.calls["evalsha"] != 10 || len(u.calls) != 1 || u.in != 100 || u.out != 50 || u.cpu != 0.5e6 {
		t.Errorf("since = %+v, want 10 evalsha, 100 B in, 50 B out, 0.5 s of CPU", u)
	}
}

func TestKindOf(t *testing.T) {
	for key, want := range map[string]string{
		"vgt:key:key_2bHx9":                     "vgt:key:<id>",
		"vgt:keys:seq":                          "vgt:keys:seq",
		"vgt:lim:lease:{key_2bHx9}":             "vgt:lim:lease:{<client>}",
		"vgt:lim:quota:{key_2bHx9}:2026-12":     "vgt:lim:quota:{<client>}:<period>",
		"vgt:lim:quota:{key_2bHx9}:2026-12-07":  "vgt:lim:quota:{<client>}:<period>",
		"vgt:usage:key_2bHx9:2026-12-07":        "vgt:usage:<client>:<day>",
		"vgt:usage-hour:2026-12-07T06":          "vgt:usage-hour:<hour>",
		"vgt:usage-slot:2026-12-07T06:55":       "vgt:usage-slot:<slot>",
		"vgt:usage-writer:abc":                  "vgt:usage-writer:<writer>",
		"vgt:upstream:lockout:0123456789abcdef": "vgt:upstream:lockout:0123456789abcdef",
	} {
		if got := kindOf(key); got != want {
			t.Errorf("kindOf(%s) = %s, want %s", key, got, want)
		}
	}
}

// A failed benchmark's stack trace names files by this machine's paths:
// the report names them relative to the module and to $GOROOT.
func TestWithoutMachinePaths(t *testing.T) {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	root, err := exec.Command("go", "env", "GOROOT").Output()
	if err != nil {
		t.Skip("no go command:", err)
	}
	in := "\t" + wd + "/proxy/models.go:144 +0x8c\n\t" + strings.TrimSpace(string(root)) + "/src/testing/benchmark.go:219\n"
	got := withoutMachinePaths(t.Context(), "go", in)
	if want := "\tproxy/models.go:144 +0x8c\n\t$GOROOT/src/testing/benchmark.go:219\n"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
