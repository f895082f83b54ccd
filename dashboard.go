package vigthoria

import (
	"iter"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/vigthoria/caddy-vigthoria/caller/anonymous"
	"github.com/vigthoria/caddy-vigthoria/caller/header"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/dashboard"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// storeSpec resolves a handler's store as configured into the key of its
// service in keyServices: placeholders resolved, the default filled in.
func storeSpec(configured string) (spec, kind string, err error) {
	if configured == "" {
		configured = "sqlite:" + store.DefaultSQLitePath()
	}
	spec = caddy.NewReplacer().ReplaceAll(configured, "")
	kind, _, err = store.ParseSpec(spec)
	return spec, kind, err
}

// loadKeyService returns the shared service of spec, counting one more
// user of it: keyServices.Delete(spec) gives it back.
func loadKeyService(spec string) (*keys.Service, error) {
	svc, _, err := keyServices.LoadOrNew(spec, func() (caddy.Destructor, error) {
		svc, err := keys.NewService(spec, caddy.Log().Named("vigthoria.keystore"))
		return keyService{svc}, err
	})
	if err != nil {
		return nil, err
	}
	return svc.(keyService).Service, nil
}

// KeyService implements dashboard.Source.
func (*App) KeyService(store string) (*keys.Service, string, func() error, error) {
	spec, _, err := storeSpec(store)
	if err != nil {
		return nil, "", nil, err
	}
	svc, err := loadKeyService(spec)
	if err != nil {
		return nil, "", nil, err
	}
	release := func() error {
		_, err := keyServices.Delete(spec)
		return err
	}
	return svc, spec, release, nil
}

// Policy implements dashboard.Source: the first handler of the store's.
func (a *App) Policy(spec string) dashboard.Policy {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, h := range a.handlers {
		if h.storeSpec == spec {
			return handlerPolicy{h}
		}
	}
	return nil
}

// collected yields the metrics that cs hold now.
func collected(cs ...prometheus.Collector) iter.Seq[*dto.Metric] {
	return func(yield func(*dto.Metric) bool) {
		ch := make(chan prometheus.Metric, 64)
		go func() {
			for _, c := range cs {
				c.Collect(ch)
			}
			close(ch)
		}()
		defer func() {
			for range ch { // the collectors are done before it returns
			}
		}()
		for m := range ch {
			var d dto.Metric
			if m.Write(&d) == nil && !yield(&d) {
				return
			}
		}
	}
}

// Counters implements dashboard.Source from the module's metrics.
func (*App) Counters() dashboard.Counters {
	c := dashboard.Counters{Refused: make(map[string]int64)}
	for d := range collected(metrics.requests) {
		n := int64(d.GetCounter().GetValue())
		c.Requests += n
		for _, l := range d.GetLabel() {
			if reason, ok := strings.CutPrefix(l.GetValue(), "refused_"); ok && l.GetName() == "outcome" {
				c.Refused[reason] += n
			}
		}
	}
	var g dto.Metric
	if metrics.activeStreams.Write(&g) == nil {
		c.Streams = int64(g.GetGauge().GetValue())
	}
	c.Queued, c.QueueWaited, c.QueueWait = queueFigures()
	return c
}

// handlerPolicy is a vigthoria handler's tiers and prices.
type handlerPolicy struct{ h *Handler }

func (p handlerPolicy) Tiers() []string {
	names := make([]string, 0, len(p.h.Tiers))
	for name := range p.h.Tiers {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

func (p handlerPolicy) Currency() string {
	if !p.h.policy.Priced() {
		return ""
	}
	return p.h.Currency
}

func (p handlerPolicy) Limits(tier string, s *policy.Settings) (dashboard.Limits, bool) {
	t := p.h.policy.TierFor(tier, s)
	if t == nil {
		return dashboard.Limits{}, false
	}
	l := dashboard.Limits{Concurrent: t.Concurrent, Models: t.Models, MaxTokens: t.MaxTokens}
	if r := t.Requests; r != nil {
		l.Requests = &policy.Rate{N: r.N, Window: time.Duration(r.Window), Burst: r.Burst}
	}
	if r := t.Tokens; r != nil {
		l.Tokens = &policy.Rate{N: r.N, Window: time.Duration(r.Window), Burst: r.Burst}
	}
	if q := t.Quota; q != nil {
		l.Quota = &policy.Amount{N: q.N, Period: q.Period}
	}
	if b := &t.BudgetLimits().Quota; !b.Unlimited() {
		l.Budget = &policy.Amount{N: b.N, Period: b.Period.String()}
	}
	return l, true
}

// Caller implements dashboard.Policy: a minted token's user is counted
// in its minting key's rows; a JWT's user has its issuer's tier when no
// tier claim can change it; an identity has identity_tier when it is a
// literal, an anonymous caller the anonymous tier.
func (p handlerPolicy) Caller(client string) (string, bool) {
	switch {
	case strings.HasPrefix(client, mintPrefix):
		return "", true
	case strings.HasPrefix(client, jwtPrefix):
		for _, j := range p.h.JWT {
			if j.TierClaim == "" && strings.HasPrefix(client, jwtPrefix+j.host+":") {
				return j.Tier, false
			}
		}
	case strings.HasPrefix(client, header.Prefix):
		return p.h.identityTier, false
	case strings.HasPrefix(client, anonymous.Prefix):
		return p.h.Anonymous, false
	}
	return "", false
}

// Interface guards
var _ dashboard.Source = (*App)(nil)
