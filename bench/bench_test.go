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
