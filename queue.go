package vigthoria

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigthoria/caddy-vigthoria/admission"
	"github.com/vigthoria/caddy-vigthoria/internal/pause"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// queueWaitHeader tells a caller how long its request waited for its
// turn, in whole milliseconds; only a request that waited has it.
const queueWaitHeader = "X-Vigthoria-Queue-Wait"

var queueMetrics = struct {
	wait   *prometheus.HistogramVec
	length *prometheus.GaugeVec
}{
	wait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "vigthoria", Name: "queue_wait_seconds",
		Help:    "How long requests that waited in the queue waited for their turn, by tier.",
		Buckets: []float64{.005, .025, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 600},
	}, []string{"tier"}),
	length: prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "vigthoria", Name: "queue_length",
		Help: "Requests waiting for the upstream's capacity now, by tier.",
	}, []string{"tier"}),
}

var (
	queueWaitBy = newLabelCache(func(tier string) prometheus.Observer {
		return queueMetrics.wait.WithLabelValues(tier)
	})
	queueLengthBy = newLabelCache(func(tier string) prometheus.Gauge {
		return queueMetrics.length.WithLabelValues(tier)
	})
)

// provisionQueue sets up the site's queue when queue (the site's or a
// tier's) or upstream_limits is configured; the fingerprint of the
// upstream and its server keys names the upstream's account in the
// limiter, which the instances of a fleet with the same pool share.
func (h *Handler) provisionQueue(ctx caddy.Context, keys []proxy.ServerKey) error {
	site := h.Queue
	if site != nil {
		if err := site.Check(true); err != nil {
			return err
		}
	}
	on := site != nil && !site.Off || h.UpstreamLimits != nil
	cfg := admission.QueueConfig{
		Limiter: h.limiter, Logger: h.logger,
		Length: policy.DefaultQueueLength, Tiers: make(map[string]admission.TierQueue, len(h.Tiers)),
		OnLength: func(tier string, delta int) { queueLengthBy.get(tier).Add(float64(delta)) },
	}
	if site != nil && !site.Off {
		cfg.Length, cfg.PerCaller = site.Length, site.PerCaller
		cfg.Default.MaxWait = time.Duration(site.MaxWait)
	}
	// Of the queue's places, a sixteenth at most for one caller: one
	// caller's burst cannot fill the queue, sixteen busy callers can.
	cfg.PerCaller = max(cfg.PerCaller, 0)
	if cfg.PerCaller == 0 {
		cfg.PerCaller = max(1, cfg.Length/16)
	}
	for name, t := range h.Tiers {
		tq := admission.TierQueue{Weight: t.TierWeight(), MaxWait: cfg.Default.MaxWait}
		if q := t.Queue; q != nil {
			on = on || !q.Off
			tq.MaxWait, tq.PerCaller = time.Duration(q.MaxWait), q.PerCaller
		}
		cfg.Tiers[name] = tq
	}
	if !on {
		return nil
	}
	// The upstream's word that every server key is spent is waited out
	// in the queue's order too; a model's, which the queue's order does
	// not know, by each request (upstreamExhausted).
	cfg.Exhausted = func(ctx context.Context, now time.Time) (time.Duration, bool) {
		// A probe claimed here goes upstream next: the dispatcher's
		// request has its turn.
		wait, exhausted, _ := h.upstream.Exhausted(ctx, "", now)
		return wait, exhausted
	}
	if u := h.UpstreamLimits; u != nil {
		lim, err := u.Limits()
		if err != nil {
			return err
		}
		cfg.Limits = &lim
		cfg.Account = admission.UpstreamPrefix + poolFingerprint(h.Upstream, keys)
	}
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		for _, c := range []prometheus.Collector{queueMetrics.wait, queueMetrics.length} {
			var already prometheus.AlreadyRegisteredError
			if err := reg.Register(c); err != nil && !errors.As(err, &already) {
				return err
			}
		}
	}
	h.queue = admission.NewQueue(cfg)
	h.queue.Start()
	return nil
}

// upstreamExhausted reports whether the upstream's word that the key
// (model "") or model is spent stops the request, and for how long: it
// waits that out instead when the caller's queue allows that long
// still, and asks again, since after the reset one request probes the
// upstream while the others are still held.
func (x *exchange) upstreamExhausted(model string) (time.Duration, bool) {
	now := x.now
	for {
		wait, exhausted, probe := x.h.upstream.Exhausted(x.r.Context(), model, now)
		if probe != (proxy.ProbeClaim{}) {
			x.probes = append(x.probes, probe)
		}
		if !exhausted || !x.waitExhausted(max(wait, admission.QueuePoll)) {
			return wait, exhausted
		}
		now = time.Now()
	}
}

// releaseProbes gives back the probes of a locked upstream the request
// was let through as, unless it was sent upstream: one the proxy refused
// itself, or whose caller left first, would hold off the next probe, and
// every caller, for the probe's interval.
func (x *exchange) releaseProbes() {
	if x.call != nil && x.call.Usage.Sent() {
		return
	}
	for _, p := range x.probes {
		p.Release()
	}
}

// waitExhausted waits d when the caller's queue allows that long still;
// it reports whether it did.
func (x *exchange) waitExhausted(d time.Duration) bool {
	q := x.h.queue
	if q == nil || d > q.MaxWait(x.client.Tier)-x.queueWait {
		return false
	}
	start := time.Now()
	ok := pause.For(x.r.Context(), d)
	x.queueWait += time.Since(start)
	return ok
}

// waitOwn lets a request that its caller's concurrency refused wait for
// one of its own slots, when its tier queues.
func (x *exchange) waitOwn(set policy.LimitSet, f *admission.Refusal) *admission.Refusal {
	q := x.h.queue
	if q == nil || f.Reason != limiter.ConcurrencyLimit {
		return f
	}
	h, r := x.h, x.r
	a, waited, f := q.Own(r.Context(), x.client.Tier, x.client.ID, f, func(now time.Time) (admission.Admission, *admission.Refusal) {
		return h.admitter.Admit(r.Context(), x.client, x.policy, set, now)
	})
	x.queueWait += waited
	if f == nil {
		x.adm = a
	}
	return f
}

// waitUpstream holds a reserved request until the upstream takes it (its
// upstream_limits, its word on the server keys), in its turn; its settle
// frees what it took. While it waits, its body holds only what it sends.
func (x *exchange) waitUpstream(body *proxy.Body) *admission.Refusal {
	q := x.h.queue
	if !q.Gates() {
		return nil
	}
	lease, waited, f := q.Upstream(x.r.Context(), admission.Turn{
		Tier: x.client.Tier, Caller: x.client.ID, Reserve: x.adm.Lease.Reserved, Spent: x.queueWait,
		Waiting: func() { body.Compact(x.r, x.call) },
	})
	x.queueWait += waited
	if f != nil {
		return f
	}
	x.adm.JoinUpstream(q, lease)
	if q.Learns() {
		// A retry of what the upstream says spent waits its turn again.
		x.call.Hold = func(ctx context.Context) bool {
			_, waited, f := q.Upstream(ctx, admission.Turn{Tier: x.client.Tier, Caller: x.client.ID, Spent: x.queueWait, Again: true})
			x.queueWait += waited
			return f == nil
		}
	}
	return nil
}

// noteQueueWait tells an admitted request's caller, the metrics and the
// access log how long it waited, when it did.
func (x *exchange) noteQueueWait(h http.Header) {
	if x.queueWait <= 0 {
		return
	}
	h.Set(queueWaitHeader, strconv.FormatInt(x.queueWait.Milliseconds(), 10))
	queueWaitBy.get(x.client.Tier).Observe(x.queueWait.Seconds())
}

// queueFigures reads the queue's metrics, over every tier: the requests
// waiting now, and the requests that waited and their waits' sum in
// seconds since the process started.
func queueFigures() (queued, waited int64, wait float64) {
	for d := range collected(queueMetrics.length, queueMetrics.wait) {
		if h := d.GetHistogram(); h != nil {
			waited += int64(h.GetSampleCount())
			wait += h.GetSampleSum()
			continue
		}
		queued += int64(d.GetGauge().GetValue())
	}
	return queued, waited, wait
}

// poolFingerprint names an upstream and its pool of server keys,
// whatever their order, as proxy.Fingerprint names one key.
func poolFingerprint(url string, keys []proxy.ServerKey) string {
	all := make([]string, len(keys))
	for i, k := range keys {
		all[i] = k.Key
	}
	slices.Sort(all)
	return proxy.Fingerprint(url, strings.Join(all, "\x00"))
}
