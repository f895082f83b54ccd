package main

import (
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

// The target of the queue and the pool differs from the module's by them.
func TestUpstreamFeaturesSite(t *testing.T) {
	if !strings.Contains(upstreamFeaturesSite, "api_keys {") || strings.Contains(upstreamFeaturesSite, "api_key {env") {
		t.Errorf("the site kept its one api_key:\n%s", upstreamFeaturesSite)
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
		v := (&burstRun{unloaded: unloaded, shots: tc.shots}).verdict()
		if !v.measured || v.met != tc.met {
			t.Errorf("%s: verdict %v (%s), want met %v", tc.name, v, v.figure, tc.met)
		}
	}
	if v := (*burstRun)(nil).verdict(); v.measured {
		t.Errorf("a burst not run is measured: %v", v)
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
