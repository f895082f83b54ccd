package vigthoria

import (
	"net/http"

	"github.com/caddyserver/caddy/v2"
	lru "github.com/hashicorp/golang-lru/v2"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/keystore"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// maxKeyTiers bounds the cache of tiers merged with keys' own settings:
// about a kilobyte each. Keys past it are merged again when they call.
const maxKeyTiers = 65536

// tierKey names a tier merged with a key's settings, or a token's tier
// narrowed by its minter and models (see mintedTier). A key's settings
// get a new pointer whenever they change, and so does its merged tier,
// so an entry never goes stale; a reload makes a new cache, so tier
// changes apply.
type tierKey struct {
	name     string
	settings *policy.Settings
	minter   *Tier
	models   string // keystore.Minted.ModelsKey
}

// newTierCache makes the cache of merged tiers.
func newTierCache() *lru.Cache[tierKey, *Tier] {
	c, _ := lru.New[tierKey, *Tier](maxKeyTiers) // fails only for a size below 1
	return c
}

// tierFor returns the tier a caller of tier name is limited by: the
// configured one when s is nil, else that tier with each field that s
// sets replaced by s's. It returns nil when the tier is not configured,
// or when s cannot apply to it. A cached merge costs a lookup and no
// allocation.
func (h *Handler) tierFor(name string, s *policy.Settings) *Tier {
	base := h.Tiers[name]
	if base == nil || s == nil {
		return base
	}
	k := tierKey{name: name, settings: s}
	if t, ok := h.keyTiers.Get(k); ok {
		return t
	}
	t, err := base.merge(name, s)
	if err != nil {
		// Settings are checked before they are stored: only a store
		// written by something else holds such.
		h.logger.Error("a key's settings cannot apply: its requests are refused", zap.String("tier", name), zap.Error(err))
		return nil
	}
	h.keyTiers.Add(k, t)
	return t
}

// merge returns a provisioned copy of t, named name, with each field that
// s sets replaced by s's.
func (t *Tier) merge(name string, s *policy.Settings) (*Tier, error) {
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
		m.Budget = &Budget{Amount: policy.FormatMoney(s.Budget.N), Period: s.Budget.Period}
	}
	if s.Models != nil {
		m.Models = s.Models
	}
	if s.MaxTokens != nil {
		m.MaxTokens = *s.MaxTokens
	}
	return m, m.provision(name)
}

func tierRate(r *policy.Rate) *Rate {
	return &Rate{N: r.N, Window: caddy.Duration(r.Window), Burst: r.Burst}
}

// mintedTier returns the tier the user of a minted token is decided by:
// own, its token's tier, for its own limits, narrowed to what the key
// that minted the token may do now — that key's tier with its settings,
// read on every request so that a change reaches tokens minted before —
// and to the token's own models. A user may use a model only when all
// three allow it, ask at most the lower max_tokens (which is also what a
// request without one gets), only from the key's origins; the key's
// limits and budget bound all of its users together (admit, budgets).
// It returns nil when the key's tier is not configured. Once cached, it
// costs lookups and no allocation.
func (h *Handler) mintedTier(own *Tier, c keystore.Client) *Tier {
	minter := h.tierFor(c.Minted.KeyTier, h.keys.Settings(c.Minted.KeyID))
	if minter == nil {
		return nil
	}
	return h.narrowTier(own, minter, c)
}

// narrowTier is own narrowed by minter and by the models of c's token
// (see mintedTier), cached.
func (h *Handler) narrowTier(own, minter *Tier, c keystore.Client) *Tier {
	k := tierKey{name: c.Tier, settings: c.Settings, minter: minter, models: c.Minted.ModelsKey}
	if t, ok := h.keyTiers.Get(k); ok {
		return t
	}
	t := *own
	t.minter, t.tokenModels, t.keySettings = minter, c.Minted.Models, minter.keySettings
	if minter.MaxTokens > 0 && (t.MaxTokens == 0 || minter.MaxTokens < t.MaxTokens) {
		t.MaxTokens = minter.MaxTokens
	}
	// The policy is the intersection of the parts, whatever their order;
	// each is a FilterKey, which quotes its globs: no NUL in it. The
	// parts that narrow nothing ("") are left out, so that a user whom
	// nothing narrows shares its tier's list.
	for _, part := range [2]string{minter.modelsKey, c.Minted.ModelsKey} {
		switch {
		case part == "":
		case t.modelsKey == "":
			t.modelsKey = part
		default:
			t.modelsKey += "\x00" + part
		}
	}
	h.keyTiers.Add(k, &t)
	return &t
}

// originAllowed reports whether a caller of tier may call from the
// request's web origin: its key's origins, or for the user of a minted
// token those of the key that minted it. Requests without Origin
// (servers, SDKs) are allowed; the site's cors list is applied before.
func originAllowed(r *http.Request, tier *Tier) bool {
	return tier.keySettings.AllowsOrigin(r.Header.Get("Origin"))
}

// errKeyOriginNotAllowed refuses a request from a web origin that the
// caller's key is not bound to.
var errKeyOriginNotAllowed = func() *proxy.APIError {
	e := *errOriginNotAllowed
	e.Message = "This key may not be used from this web origin."
	return &e
}()
