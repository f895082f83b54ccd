package vigthoria

import (
	"errors"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// The module's metrics. They are made once per process, so that counts
// run on across config reloads, and registered into each config's
// registry, where Caddy's metrics handler and admin /metrics serve them.
// Labels are tiers, endpoints, models, outcomes, configured issuers and
// server keys' names or fingerprints, never a key or a client: their number stays small.
var metrics = struct {
	requests        *prometheus.CounterVec
	tokens          *prometheus.CounterVec
	upstreamLatency *prometheus.HistogramVec
	firstByte       prometheus.Histogram
	activeStreams   prometheus.Gauge
	modelsCache     *prometheus.CounterVec
	retries         prometheus.Counter
	storeFallback   prometheus.Gauge
	storeFailures   prometheus.Counter
	keyFetchErrors  *prometheus.CounterVec
	pastCap         *prometheus.CounterVec
	detached        prometheus.GaugeFunc
	detachRefused   prometheus.CounterFunc
	answerBytes     prometheus.GaugeFunc
	keyUp           *prometheus.GaugeVec
	keyRefusals     *prometheus.CounterVec
}{
	keyUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "vigthoria", Name: "upstream_key_up",
		Help: "1 while a server key is in the pool, 0 while the upstream refuses it (401/403) and probes decide; by the key's name or fingerprint.",
	}, []string{"key"}),
	keyRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "upstream_key_refusals_total",
		Help: "Times the upstream refused a server key (401/403), by the key's name or fingerprint.",
	}, []string{"key"}),
	requests: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "requests_total",
		Help: "Requests by tier, endpoint and outcome: ok, cached, upstream_4xx, upstream_5xx, upstream_error, or refused_<reason>.",
	}, []string{"tier", "endpoint", "outcome"}),
	tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "tokens_total",
		Help: "Tokens charged, by tier, model and kind (prompt or completion).",
	}, []string{"tier", "model", "kind"}),
	upstreamLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "vigthoria", Name: "upstream_header_seconds",
		Help:    "Time until the upstream's response headers, retries included, by endpoint.",
		Buckets: []float64{.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
	}, []string{"endpoint"}),
	firstByte: prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "vigthoria", Name: "stream_first_event_seconds",
		Help:    "Time until a stream's first event reached the client.",
		Buckets: []float64{.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
	}),
	activeStreams: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "vigthoria", Name: "active_streams", Help: "Streams being served now.",
	}),
	modelsCache: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "models_cache_total",
		Help: "GET /v1/models answers by cache result: hit, miss or stale.",
	}, []string{"result"}),
	retries: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "upstream_retries_total", Help: "Upstream attempts repeated after a 429, 502, 503 or failed connection.",
	}),
	storeFallback: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "vigthoria", Name: "store_fallback",
		Help: "1 while the shared store (Redis) fails and on_store_error is in force, else 0.",
	}),
	storeFailures: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "store_failures_total", Help: "Times the shared store started failing.",
	}),
	keyFetchErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "jwt_key_fetch_failures_total",
		Help: "Failed fetches of an OpenID issuer's signing keys, by configured issuer; its tokens are checked with the keys fetched before, if any.",
	}, []string{"issuer"}),
	pastCap: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "usage_past_cap_total",
		Help: "Answers whose reported completion tokens passed the cap the request was sent and what the answer carried, by tier: the upstream ignored max_tokens, or misreports.",
	}, []string{"tier"}),
	detached: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "vigthoria", Name: "detached_calls",
		Help: "Upstream calls going on after their caller left, to be charged what the upstream reports.",
	}, func() float64 { now, _ := proxy.Detached(); return float64(now) }),
	detachRefused: prometheus.NewCounterFunc(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "detached_refused_total",
		Help: "Callers who left while max_detached calls were detached: their calls were cut at once and charged the most the upstream may bill.",
	}, func() float64 { _, refused := proxy.Detached(); return float64(refused) }),
	answerBytes: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "vigthoria", Name: "answer_buffered_bytes",
		Help: "Bytes the upstream's answers hold in memory now, over the process: streams' events not yet whole, JSON answers read whole; bounded by max_buffered.",
	}, func() float64 { return float64(wire.Held()) }),
}

// registerMetrics registers the collectors into a config's registry.
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	for _, c := range append([]prometheus.Collector{
		metrics.requests, metrics.tokens, metrics.upstreamLatency, metrics.firstByte,
		metrics.activeStreams, metrics.modelsCache, metrics.retries, metrics.storeFallback, metrics.storeFailures,
		metrics.keyFetchErrors, metrics.pastCap, metrics.detached, metrics.detachRefused, metrics.answerBytes,
		metrics.keyUp, metrics.keyRefusals,
	}, alerts.Collectors()...) {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

// newFallback is limiter.NewFallback with the store metrics kept.
func newFallback(shared limiter.Shared, policy limiter.OnError, logger *zap.Logger) *limiter.Fallback {
	f := limiter.NewFallback(shared, policy, maxLimitedClients, logger)
	f.OnChange = onStoreChange
	return f
}

// onStoreChange keeps the store metrics when a Fallback changes course.
func onStoreChange(down bool) {
	if down {
		metrics.storeFallback.Set(1)
		metrics.storeFailures.Inc()
		return
	}
	metrics.storeFallback.Set(0)
}

// labelCache remembers the children of a metric vector by their label
// values: WithLabelValues hashes and checks its labels on every call, and
// the request path records four or five of them. It holds at most
// maxCachedLabels children; past that, they are looked up as before.
type labelCache[K comparable, V any] struct {
	child func(K) V
	mu    sync.RWMutex
	m     map[K]V
}

const maxCachedLabels = 4096

func newLabelCache[K comparable, V any](child func(K) V) *labelCache[K, V] {
	return &labelCache[K, V]{child: child, m: make(map[K]V)}
}

func (c *labelCache[K, V]) get(k K) V {
	c.mu.RLock()
	v, ok := c.m[k]
	c.mu.RUnlock()
	if ok {
		return v
	}
	v = c.child(k)
	c.mu.Lock()
	if len(c.m) < maxCachedLabels {
		c.m[k] = v
	}
	c.mu.Unlock()
	return v
}

// The children the request path uses, by their label values.
var (
	// requestsBy is requests_total by tier, endpoint and outcome.
	requestsBy = newLabelCache(func(k [3]string) prometheus.Counter {
		return metrics.requests.WithLabelValues(k[0], k[1], k[2])
	})
	// refusalsBy is requests_total by tier, endpoint and refusal code.
	refusalsBy = newLabelCache(func(k [3]string) prometheus.Counter {
		return metrics.requests.WithLabelValues(k[0], k[1], "refused_"+k[2])
	})
	// tokensBy is tokens_total by tier and model label (modelLabel):
	// prompt, completion.
	tokensBy = newLabelCache(func(k [2]string) [2]prometheus.Counter {
		return [2]prometheus.Counter{
			metrics.tokens.WithLabelValues(k[0], k[1], "prompt"),
			metrics.tokens.WithLabelValues(k[0], k[1], "completion"),
		}
	})
	// latencyBy is upstream_header_seconds by endpoint.
	latencyBy = newLabelCache(func(endpoint string) prometheus.Observer {
		return metrics.upstreamLatency.WithLabelValues(endpoint)
	})
	// pastCapBy is usage_past_cap_total by tier.
	pastCapBy = newLabelCache(func(tier string) prometheus.Counter {
		return metrics.pastCap.WithLabelValues(tier)
	})
	// modelsCacheBy is models_cache_total by the cache's word: HIT, MISS or STALE.
	modelsCacheBy = newLabelCache(func(result string) prometheus.Counter {
		return metrics.modelsCache.WithLabelValues(strings.ToLower(result))
	})
)

// modelLabel is model as the metrics' label: a name the operator
// configured (a tier's models or a price, written out, not a glob) or the
// upstream listed in its cached GET /models, else "other". Callers choose
// model names, and labels are never theirs to choose: a burst of made-up
// names neither grows the metrics nor changes how listed models count.
func (h *Handler) modelLabel(model string) string {
	if model == "" {
		return "none"
	}
	if _, ok := h.modelNames[model]; ok || h.upstream.Listed(model) {
		return model
	}
	return "other"
}

// configuredModels are the model names the tiers and prices write out:
// a glob matches names, it names none.
func configuredModels(tiers map[string]*policy.Tier, prices []*policy.Price) map[string]struct{} {
	names := make(map[string]struct{})
	add := func(glob string) {
		if !strings.ContainsAny(glob, `*?[\`) {
			names[glob] = struct{}{}
		}
	}
	for _, t := range tiers {
		for _, g := range t.Models {
			add(g)
		}
	}
	for _, p := range prices {
		add(p.Model)
	}
	return names
}

// outcome names how an answered request ended, for the metrics and logs.
func outcome(status int) string {
	switch {
	case status == 0:
		return "upstream_error"
	case status < 400:
		return "ok"
	case status < 500:
		return "upstream_4xx"
	}
	return "upstream_5xx"
}

// tierLabel is a tier's name as a metric label: only configured tiers are
// labels, since a tier from a placeholder is the caller's to choose.
func (h *Handler) tierLabel(name string) string {
	if _, ok := h.Tiers[name]; ok {
		return name
	}
	if name == "" {
		return "none"
	}
	return "unknown"
}
