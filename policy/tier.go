package policy

import (
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// Tier is a named class of callers and its limits. Every field is
// optional: a tier without limits admits its callers freely. A client
// key may have settings of its own (caddy vigthoria key add --requests …,
// key update): each replaces the tier's field of the same name for that
// key's requests, and the fields it does not set follow the tier.
type Tier struct {
	// Requests allowed per window, as a token bucket: {"n":60,"window":"1m","burst":10}.
	// Burst defaults to n.
	Requests *TierRate `json:"requests,omitempty"`

	// Prompt plus completion tokens allowed per window, as a token bucket.
	// A request reserves its estimate (prompt size plus max_tokens times its
	// choices: n or best_of for each prompt) and is then charged what the
	// upstream reports.
	Tokens *TierRate `json:"tokens,omitempty"`

	// Requests in flight at once, streams included.
	Concurrent int `json:"concurrent,omitempty"`

	// Tokens allowed per calendar day or month (UTC): {"n":1000000,"period":"day"}.
	Quota *Quota `json:"quota,omitempty"`

	// Money allowed per calendar day or month (UTC), in the currency of
	// prices: {"amount":"50","period":"month"}. Admission reserves a
	// request's highest possible cost and settlement charges the real
	// one. A model without a price is then refused, unless unpriced is
	// free. Default: none.
	Budget *Budget `json:"budget,omitempty"`

	// Model globs this tier may use, e.g. ["vigthoria-fast-*"]; '*'
	// matches any run of characters, '/' included (see
	// keys.MatchModel). Default: all.
	Models []string `json:"models,omitempty"`

	// The most max_tokens (or max_completion_tokens) a request may ask,
	// per answer (choice); a request without a cap is forwarded with
	// this one. Default: no cap, and a request without one gets the
	// handler's default_max_tokens.
	MaxTokens int64 `json:"max_tokens,omitempty"`

	// The most bytes that the request bodies of this tier's callers may
	// hold at once: its share of the handler's max_buffered, there for it
	// whatever other tiers' callers send. Tiers without one split what
	// the others leave equally, except the anonymous tier, which gets
	// max_body, or an eighth of max_buffered when that is more (all of
	// the rest when it is the only tier left). At least max_body; the
	// tiers' shares add up to at most max_buffered.
	MaxBuffered int64 `json:"max_buffered,omitempty"`

	// The most bytes that one caller's bodies may hold of the tier's
	// share. Default: a quarter of the share, or concurrent times
	// max_body when that is less, and at least max_body.
	MaxBufferedPerCaller int64 `json:"max_buffered_per_caller,omitempty"`

	// The tier's share of the upstream when requests queue for it (see
	// the handler's queue and upstream_limits), from 1 to 1000: a tier of
	// weight 3 gets three requests through for each one of a tier of
	// weight 1 while both have requests waiting. Default: 1.
	Weight int `json:"weight,omitempty"`

	// How long this tier's requests wait for capacity, over the site's
	// queue: {"max_wait": "5s"}, or {"off": true} for an instant 429.
	// It may set max_wait and per_caller, not length. Default: the
	// site's queue.
	Queue *Queue `json:"queue,omitempty"`

	limits    limiter.Limits
	budget    limiter.Limits // the budget as a quota of micro-units; zero without a budget
	modelsKey string         // names the models policy in the models cache
	// lesser are the limits of requests that generate nothing, by
	// LimitSet (less one): see limitsFor.
	lesser [3]limiter.Limits
	bodies *proxy.Share // MaxBuffered and MaxBufferedPerCaller, counted

	// keySettings are those of the caller's key, or of the key that
	// minted its token: their origins bind the caller (originAllowed).
	// nil for a configured tier.
	keySettings *Settings
	// minter is the tier of the key that minted a token, with that key's
	// settings, for the token's user: its models and max_tokens narrow
	// this tier's, its limits and budget bound the key's users together,
	// its origins are theirs. nil for every other caller.
	minter      *Tier
	tokenModels []string // a minted token's own model globs; nil: the tiers'
}

// TierRate is a number allowed per window, as a tier configures it.
type TierRate struct {
	N      int64          `json:"n"`
	Window caddy.Duration `json:"window"`
	Burst  int64          `json:"burst,omitempty"`
}

// Quota is a number of tokens per calendar period: "day" or "month".
type Quota struct {
	N      int64  `json:"n"`
	Period string `json:"period"`
}

// Budget is an amount of money per calendar period: "day" or "month".
// The amount is a decimal string, such as "50" or "12.50", read exactly.
type Budget struct {
	Amount string `json:"amount"`
	Period string `json:"period"`
}

// limits is the budget as the limiter keeps it: a quota of micro-units
// of the currency, in an account of its own.
func (b *Budget) limits() (limiter.Limits, error) {
	n, err := ParseMoney(b.Amount, MaxMoney)
	if err != nil {
		return limiter.Limits{}, err
	}
	if n <= 0 {
		return limiter.Limits{}, fmt.Errorf("budget %s must be above zero", b.Amount)
	}
	period, err := parsePeriod(b.Period)
	if err != nil {
		return limiter.Limits{}, err
	}
	// A request holds its reservation until it is settled: in flight,
	// though there is no concurrency limit, so that a limiter never
	// forgets the account while its reservations are out.
	return limiter.Limits{Quota: limiter.Quota{N: n, Period: period}}, nil
}

// DefaultMaxTokens is the default of default_max_tokens: the cap a
// request without one is forwarded with, and reserves, when its tier
// sets none.
const DefaultMaxTokens = 4096

// provision checks the tier and derives its limiter limits.
func (t *Tier) provision(name string) error {
	for _, r := range []*TierRate{t.Requests, t.Tokens} {
		if r != nil && (r.N <= 0 || r.Window <= 0 || r.Burst < 0) {
			return fmt.Errorf("tier %s: a rate needs a positive n and window", name)
		}
	}
	if t.Requests != nil {
		t.limits.Requests = limiter.Rate{N: t.Requests.N, Window: time.Duration(t.Requests.Window), Burst: t.Requests.Burst}
	}
	if t.Tokens != nil {
		t.limits.Tokens = limiter.Rate{N: t.Tokens.N, Window: time.Duration(t.Tokens.Window), Burst: t.Tokens.Burst}
	}
	if t.Concurrent < 0 || t.MaxTokens < 0 {
		return fmt.Errorf("tier %s: concurrent and max_tokens must be positive", name)
	}
	if t.MaxTokens > wire.MaxTokenCap {
		return fmt.Errorf("tier %s: max_tokens must be at most %d, the most a request may ask", name, wire.MaxTokenCap)
	}
	t.limits.Concurrent = t.Concurrent
	if t.Weight < 0 || t.Weight > MaxWeight {
		return fmt.Errorf("tier %s: weight must be from 1 to %d, not %d", name, MaxWeight, t.Weight)
	}
	if t.Queue != nil {
		if err := t.Queue.Check(false); err != nil {
			return fmt.Errorf("tier %s: %v", name, err)
		}
	}
	if t.Quota != nil {
		period, err := parsePeriod(t.Quota.Period)
		if err != nil || t.Quota.N <= 0 {
			return fmt.Errorf("tier %s: a quota needs a positive n and a period of day or month", name)
		}
		t.limits.Quota = limiter.Quota{N: t.Quota.N, Period: period}
	}
	if t.Budget != nil {
		var err error
		if t.budget, err = t.Budget.limits(); err != nil {
			return fmt.Errorf("tier %s: %v", name, err)
		}
	}
	for _, glob := range t.Models {
		if err := CheckGlob(glob); err != nil {
			return fmt.Errorf("tier %s: invalid model glob '%s': %v", name, glob, err)
		}
	}
	t.modelsKey = proxy.FilterKey(t.Models)
	// Minting counts as a request, in no slot: a caller whose slots are
	// all taken by its streams may still mint, and minting never makes a
	// chat sent at that moment wait.
	mint := &t.lesser[MintLimits-1]
	*mint = t.limits
	mint.Concurrent, mint.NoSlot = 0, true
	// Reading one's standing, or the models one may use, reserves nothing
	// and spends nothing: a spent quota, budget or token bucket never
	// refuses it, only a request bucket of the tier's size (and for the
	// models, which may call the upstream, concurrency) in the caller's
	// reading account (see readPrefix).
	t.lesser[StandingLimits-1] = limiter.Limits{Requests: t.limits.Requests, NoSlot: true}
	t.lesser[ModelsLimits-1] = limiter.Limits{Requests: t.limits.Requests, Concurrent: t.limits.Concurrent}
	return nil
}

// LimitSet names which of a tier's limits a request is admitted under.
type LimitSet uint8

const (
	AllLimits      LimitSet = iota // a request that may generate
	MintLimits                     // POST /vigthoria/tokens
	StandingLimits                 // GET /v1/usage
	ModelsLimits                   // GET /v1/models
)

// Reads reports whether s is a set of a request that reads, admitted
// in the caller's reading account.
func (s LimitSet) Reads() bool { return s == StandingLimits || s == ModelsLimits }

// LimitsFor returns the tier's limits of a request of set s.
func (t *Tier) LimitsFor(s LimitSet) *limiter.Limits {
	if s == AllLimits {
		return &t.limits
	}
	return &t.lesser[s-1]
}

// LimitSetOf is the limit set of a request to the endpoint of ID id.
func LimitSetOf(id int) LimitSet {
	switch id {
	case api.Usage:
		return StandingLimits
	case api.Models:
		return ModelsLimits
	}
	return AllLimits
}

// ModelFilter is the models a caller of the tier may see in GET
// /v1/models: Allows is nil when it may use every model.
func (t *Tier) ModelFilter() proxy.ModelFilter {
	f := proxy.ModelFilter{Key: t.modelsKey}
	if len(t.Models) > 0 || t.tokenModels != nil || t.minter != nil && len(t.minter.Models) > 0 {
		f.Allows = t.Allows
	}
	return f
}

// Allows reports whether a caller of the tier may use model: its
// models, those of the key that minted its token and the token's own
// all allow it.
func (t *Tier) Allows(model string) bool {
	return matchesAny(t.Models, model) && matchesAny(t.tokenModels, model) &&
		(t.minter == nil || t.minter.Allows(model))
}

// refuser names what refuses model to a caller of the tier, for its
// refusal: the token's own models before the tier's, then the key that
// minted the token.
func (t *Tier) refuser(model string) string {
	switch {
	case !matchesAny(t.tokenModels, model):
		return "your token"
	case !matchesAny(t.Models, model):
		return "your tier"
	case t.minter != nil && !t.minter.Allows(model):
		return "the app that signed you in"
	}
	return "your tier"
}

// matchesAny reports whether model matches one of globs, or globs is
// empty: no narrowing.
func matchesAny(globs []string, model string) bool {
	if len(globs) == 0 {
		return true
	}
	for _, glob := range globs {
		if MatchModel(glob, model) {
			return true
		}
	}
	return false
}

func parsePeriod(s string) (limiter.Period, error) {
	switch s {
	case "day":
		return limiter.Day, nil
	case "month":
		return limiter.Month, nil
	}
	return 0, fmt.Errorf("period '%s' is not day or month", s)
}

// merge returns a provisioned copy of t, named name, with each field that
// s sets replaced by s's.
func (t *Tier) merge(name string, s *Settings) (*Tier, error) {
	m := &Tier{
		Requests: t.Requests, Tokens: t.Tokens, Concurrent: t.Concurrent, Quota: t.Quota,
		Budget: t.Budget, Models: t.Models, MaxTokens: t.MaxTokens, keySettings: s,
		bodies: t.bodies,
	}
	if s.Requests != nil {
		m.Requests = tierRate(s.Requests)
	}
	if s.Tokens != nil {
		m.Tokens = tierRate(s.Tokens)
	}
	if s.Concurrent != nil {
		m.Concurrent = *s.Concurrent
	}
	if s.Quota != nil {
		m.Quota = &Quota{N: s.Quota.N, Period: s.Quota.Period}
	}
	if s.Budget != nil {
		m.Budget = &Budget{Amount: FormatMoney(s.Budget.N), Period: s.Budget.Period}
	}
	if s.Models != nil {
		m.Models = s.Models
	}
	if s.MaxTokens != nil {
		m.MaxTokens = *s.MaxTokens
	}
	return m, m.provision(name)
}

func tierRate(r *Rate) *TierRate {
	return &TierRate{N: r.N, Window: caddy.Duration(r.Window), Burst: r.Burst}
}

// AllowsOrigin reports whether a caller of the tier may call from a web
// origin: its key's origins, or for the user of a minted token those of
// the key that minted it. "" (servers, SDKs) is allowed; the site's cors
// list is applied before.
func (t *Tier) AllowsOrigin(origin string) bool { return t.keySettings.AllowsOrigin(origin) }

// Limits are the tier's limits of a request that may generate.
func (t *Tier) Limits() *limiter.Limits { return &t.limits }

// BudgetLimits is the tier's budget as the limiter keeps it: a quota of
// micro-units of the currency; unlimited without a budget.
func (t *Tier) BudgetLimits() *limiter.Limits { return &t.budget }

// Minter is the tier of the key that minted the caller's token, nil for
// every other caller (see Policy.Narrow).
func (t *Tier) Minter() *Tier { return t.minter }

// Bodies is the tier's share of buffered bodies.
func (t *Tier) Bodies() *proxy.Share { return t.bodies }

// Check checks a configured budget.
func (b *Budget) Check() error {
	_, err := b.limits()
	return err
}
