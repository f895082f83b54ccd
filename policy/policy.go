package policy

import (
	"errors"
	"fmt"
	"regexp"

	lru "github.com/hashicorp/golang-lru/v2"
	"go.uber.org/zap"
)

// Config is what a Policy is made of: the handler's fields of the same
// names, their defaults set.
type Config struct {
	Tiers            map[string]*Tier
	Prices           []*Price
	Currency         string
	Unpriced         string
	DefaultMaxTokens int64
	CapField         string
	Anonymous        string // the anonymous tier, whose share of bodies is small
	MaxBody          int64
	MaxBuffered      int64
	Logger           *zap.Logger
}

// Policy is a config's policy. It is safe for concurrent use.
type Policy struct {
	cfg    Config
	prices []pricedGlob // cfg.Prices, parsed, in order
	// merged caches tiers merged with keys' settings and tokens' tiers
	// narrowed by their minters (see TierFor and Narrow).
	merged *lru.Cache[tierKey, *Tier]
}

// maxMergedTiers bounds the cache of merged tiers: about a kilobyte
// each. Keys past it are merged again when they call.
const maxMergedTiers = 65536

var tierName = regexp.MustCompile(`^[a-z0-9_-]{1,64}$`)

// New checks cfg's tiers and prices, derives their limits and gives each
// tier its share of buffered bodies.
func New(cfg Config) (*Policy, error) {
	p := &Policy{cfg: cfg}
	for name, t := range cfg.Tiers {
		if t == nil {
			return nil, fmt.Errorf("tier %s: null", name)
		}
		if err := t.provision(name); err != nil {
			return nil, err
		}
	}
	p.merged, _ = lru.New[tierKey, *Tier](maxMergedTiers) // fails only for a size below 1
	provisionShares(&cfg)
	if !currencyLabel.MatchString(cfg.Currency) {
		return nil, fmt.Errorf("invalid currency '%s': want a code such as USD, or a short label of letters", cfg.Currency)
	}
	switch cfg.Unpriced {
	case UnpricedRefuse, UnpricedFree:
	default:
		return nil, fmt.Errorf("invalid unpriced '%s': want refuse or free", cfg.Unpriced)
	}
	p.prices = make([]pricedGlob, 0, len(cfg.Prices))
	for _, pr := range cfg.Prices {
		if pr == nil {
			return nil, errors.New("prices: null entry")
		}
		parsed, err := pr.parse()
		if err != nil {
			return nil, fmt.Errorf("prices: %s: %w", pr.Model, err)
		}
		p.prices = append(p.prices, parsed)
	}
	return p, nil
}

// Validate checks the tiers' names and that their shares of buffered
// bodies fit.
func (p *Policy) Validate() error {
	for name, t := range p.cfg.Tiers {
		if !tierName.MatchString(name) {
			return fmt.Errorf("invalid tier name '%s': use a-z, 0-9, _ and -", name)
		}
		if name == "none" || name == "unknown" {
			return fmt.Errorf("tier name '%s' is reserved: metrics label callers without a configured tier with it", name)
		}
		if t == nil {
			return fmt.Errorf("tier %s: null", name)
		}
	}
	return validateShares(&p.cfg)
}

// Tier returns the configured tier of that name, or nil.
func (p *Policy) Tier(name string) *Tier { return p.cfg.Tiers[name] }

// Currency labels costs.
func (p *Policy) Currency() string { return p.cfg.Currency }

// Priced reports whether any price is configured: costs are reported.
func (p *Policy) Priced() bool { return len(p.prices) > 0 }

// tierKey names a tier merged with a key's settings, or a token's tier
// narrowed by its minter and models (see Narrow). A key's settings get
// a new pointer whenever they change, and so does its merged tier, so an
// entry never goes stale; a reload makes a new Policy, so tier changes
// apply.
type tierKey struct {
	name     string
	settings *Settings
	own      *Tier // Narrow's
	minter   *Tier
	models   string // keys.Minted.ModelsKey
}

// TierFor returns the tier a caller of tier name is limited by: the
// configured one when s is nil, else that tier with each field that s
// sets replaced by s's. It returns nil when the tier is not configured,
// or when s cannot apply to it. A cached merge costs a lookup and no
// allocation.
func (p *Policy) TierFor(name string, s *Settings) *Tier {
	base := p.cfg.Tiers[name]
	if base == nil || s == nil {
		return base
	}
	k := tierKey{name: name, settings: s}
	if t, ok := p.merged.Get(k); ok {
		return t
	}
	t, err := base.merge(name, s)
	if err != nil {
		// Settings are checked before they are stored: only a store
		// written by something else holds such.
		p.cfg.Logger.Error("a key's settings cannot apply: its requests are refused", zap.String("tier", name), zap.Error(err))
		return nil
	}
	p.merged.Add(k, t)
	return t
}

// Narrow returns the tier the user of a minted token is decided by: own,
// its token's tier, for its own limits, narrowed to what the key that
// minted the token may do now — minter, that key's tier with its
// settings, read on every request so that a change reaches tokens minted
// before — and to the token's own models (globs, and their FilterKey).
// A user may use a model only when all three allow it, ask at most the
// lower max_tokens (which is also what a request without one gets), only
// from the key's origins; the key's limits and budget bound all of its
// users together (admission). Once cached, it costs a lookup and no
// allocation.
func (p *Policy) Narrow(own, minter *Tier, models []string, modelsKey string) *Tier {
	k := tierKey{own: own, minter: minter, models: modelsKey}
	if t, ok := p.merged.Get(k); ok {
		return t
	}
	t := *own
	t.minter, t.tokenModels, t.keySettings = minter, models, minter.keySettings
	if minter.MaxTokens > 0 && (t.MaxTokens == 0 || minter.MaxTokens < t.MaxTokens) {
		t.MaxTokens = minter.MaxTokens
	}
	// The policy is the intersection of the parts, whatever their order;
	// each is a FilterKey, which quotes its globs: no NUL in it. The
	// parts that narrow nothing ("") are left out, so that a user whom
	// nothing narrows shares its tier's list.
	for _, part := range [2]string{minter.modelsKey, modelsKey} {
		switch {
		case part == "":
		case t.modelsKey == "":
			t.modelsKey = part
		default:
			t.modelsKey += "\x00" + part
		}
	}
	p.merged.Add(k, &t)
	return &t
}
