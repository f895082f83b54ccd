package main

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// results holds every sample by workload and target, in round order.
type results map[resultKey][]sample

type resultKey struct{ workload, target string }

// measureAll measures every workload on every target, round after round.
func measureAll(ctx context.Context, cfg config, up *upstream, insts []*instance, wls []workload) (results, error) {
	res := make(results)
	for round := 1; round <= cfg.rounds; round++ {
		for _, w := range wls {
			for _, inst := range insts {
				s, err := measure(ctx, cfg, up, w, inst)
				if err != nil {
					return nil, fmt.Errorf("round %d, %s on %s: %w", round, w.name, inst.name, err)
				}
				k := resultKey{w.name, inst.name}
				res[k] = append(res[k], s)
				fmt.Printf("round %d/%d  %-7s %-15s %s\n", round, cfg.rounds, w.name, inst.name, s.summary(w.stream))
			}
		}
	}
	return res, nil
}

// measure warms inst up with w, then measures it. Errors in the warm-up
// stop the run: the configuration is wrong. Errors in the measurement are
// counted and reported.
func measure(ctx context.Context, cfg config, up *upstream, w workload, inst *instance) (sample, error) {
	warm, err := w.run(ctx, inst, cfg.warmup)
	if err != nil {
		return sample{}, err
	}
	if warm.errors > 0 {
		return sample{}, fmt.Errorf("%d errors in the warm-up, the first: %s", warm.errors, warm.firstErr)
	}
	if inst.caddy != nil {
		if err := inst.caddy.resetPeakRSS(); err != nil {
			return sample{}, fmt.Errorf("resetting the peak RSS: %w", err)
		}
	}
	before := up.Count()
	var cpuBefore time.Duration
	if inst.caddy != nil {
		if cpuBefore, err = inst.caddy.cpuTime(); err != nil {
			return sample{}, err
		}
	}
	s, err := w.run(ctx, inst, cfg.duration)
	if err != nil {
		return s, err
	}
	if s.ok == 0 {
		return s, fmt.Errorf("nothing was answered; the first error: %s", s.firstErr)
	}
	s.upstreamPerReq = float64(up.Count()-before) / float64(s.ok+s.errors)
	if inst.caddy == nil {
		return s, nil
	}
	cpuAfter, err := inst.caddy.cpuTime()
	if err != nil {
		return s, err
	}
	s.cpuPerReq = float64(cpuAfter-cpuBefore) / float64(s.ok)
	s.peakRSS, err = inst.caddy.peakRSS()
	return s, err
}

// summary is one line of progress.
func (s sample) summary(stream bool) string {
	line := fmt.Sprintf("%8.1f req/s  p50 %-9s p99 %-9s", s.rate, fmtDur(float64(s.p50)), fmtDur(float64(s.p99)))
	if stream {
		line = fmt.Sprintf("%6.1f streams/s  first event p50 %-9s gap p50 %-9s gap p99 %-9s",
			s.rate, fmtDur(float64(s.p50)), fmtDur(float64(s.gap50)), fmtDur(float64(s.gap99)))
	}
	line += "  RSS " + fmtBytes(s.peakRSS)
	if s.errors > 0 {
		line += fmt.Sprintf("  %d errors (%s)", s.errors, s.firstErr)
	}
	return line
}

// A figure picks one number of a sample; durations are in nanoseconds.
type figure func(sample) float64

var (
	byRate    figure = func(s sample) float64 { return s.rate }
	byP50     figure = func(s sample) float64 { return float64(s.p50) }
	byP99     figure = func(s sample) float64 { return float64(s.p99) }
	byGap50   figure = func(s sample) float64 { return float64(s.gap50) }
	byGap99   figure = func(s sample) float64 { return float64(s.gap99) }
	byDur50   figure = func(s sample) float64 { return float64(s.dur50) }
	byPeakRSS figure = func(s sample) float64 { return float64(s.peakRSS) }
	byErrors  figure = func(s sample) float64 { return float64(s.errors) }
	byUpCalls figure = func(s sample) float64 { return s.upstreamPerReq }
	byCPU     figure = func(s sample) float64 { return s.cpuPerReq }
)

// median returns the median over the rounds of f of target t under
// workload w, and whether there was any.
func (r results) median(w, t string, f figure) (float64, bool) {
	ss := r[resultKey{w, t}]
	vs := make([]float64, len(ss))
	for i, s := range ss {
		vs[i] = f(s)
	}
	return median(vs)
}

// sum returns the sum over the rounds of f of target t under workload w.
func (r results) sum(w, t string, f figure) float64 {
	var total float64
	for _, s := range r[resultKey{w, t}] {
		total += f(s)
	}
	return total
}

// ratio returns the median over the rounds of f(t) / f(base), each
// measured in the same round.
func (r results) ratio(w, t, base string, f figure) (float64, bool) {
	return median(r.pairs(w, t, base, ratioOf, f))
}

// diff returns the median over the rounds of f(t) − f(base), each
// measured in the same round.
func (r results) diff(w, t, base string, f figure) (float64, bool) {
	return median(r.pairs(w, t, base, diffOf, f))
}

// pairs returns combine(f(t), f(base)) of each round, in round order.
func (r results) pairs(w, t, base string, combine func(a, b float64) float64, f figure) []float64 {
	return r.pairsOf(resultKey{w, t}, resultKey{w, base}, combine, f)
}

// pairsOf returns combine(f(a), f(b)) of each round, in round order: two
// targets under one workload, or two workloads on one target.
func (r results) pairsOf(a, b resultKey, combine func(a, b float64) float64, f figure) []float64 {
	ts, bs := r[a], r[b]
	vs := make([]float64, min(len(ts), len(bs)))
	for i := range vs {
		vs[i] = combine(f(ts[i]), f(bs[i]))
	}
	return vs
}

func ratioOf(a, b float64) float64 { return a / b }
func diffOf(a, b float64) float64  { return a - b }

// median returns the median of vs, sorting it, and whether vs has any.
func median(vs []float64) (float64, bool) {
	if len(vs) == 0 {
		return 0, false
	}
	slices.Sort(vs)
	if n := len(vs); n%2 == 0 {
		return (vs[n/2-1] + vs[n/2]) / 2, true
	}
	return vs[len(vs)/2], true
}
