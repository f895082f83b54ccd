package policy

import (
	"net/http"
	"net/http/httptest"
	"reflect"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// TestTierForPrecedence: each field of a key's settings replaces its
// tier's field of the same name; an unset field follows the tier, and
// a tier without the field gives none.
func TestTierForPrecedence(t *testing.T) {
	tierSet := &Tier{
		Requests:   &TierRate{N: 600, Window: caddy.Duration(time.Minute)},
		Tokens:     &TierRate{N: 400_000, Window: caddy.Duration(time.Minute), Burst: 1000},
		Concurrent: 20,
		Quota:      &Quota{N: 50_000_000, Period: "month"},
		Budget:     &Budget{Amount: "100", Period: "month"},
		Models:     []string{"vigthoria-*"},
		MaxTokens:  4096,
	}
	conc, maxTok := 5, int64(2048)
	keySet := &Settings{
		Requests:   &Rate{N: 100, Window: time.Minute},
		Tokens:     &Rate{N: 200_000, Window: time.Hour},
		Concurrent: &conc,
		Quota:      &Amount{N: 10_000_000, Period: "day"},
		Budget:     &Amount{N: 50_000_000, Period: "month"},
		Models:     []string{"vigthoria-fast-*"},
		MaxTokens:  &maxTok,
	}
	type field struct {
		name      string
		clear     func(s *Settings)
		get       func(t *Tier) any
		tier, key any // the effective value from the tier alone, from the key
		none      any // neither sets it
	}
	fields := []field{
		{"requests", func(s *Settings) { s.Requests = nil }, func(t *Tier) any { return t.limits.Requests },
			limiter.Rate{N: 600, Window: time.Minute}, limiter.Rate{N: 100, Window: time.Minute}, limiter.Rate{}},
		{"tokens", func(s *Settings) { s.Tokens = nil }, func(t *Tier) any { return t.limits.Tokens },
			limiter.Rate{N: 400_000, Window: time.Minute, Burst: 1000}, limiter.Rate{N: 200_000, Window: time.Hour}, limiter.Rate{}},
		{"concurrent", func(s *Settings) { s.Concurrent = nil }, func(t *Tier) any { return t.limits.Concurrent },
			20, 5, 0},
		{"quota", func(s *Settings) { s.Quota = nil }, func(t *Tier) any { return t.limits.Quota },
			limiter.Quota{N: 50_000_000, Period: limiter.Month}, limiter.Quota{N: 10_000_000, Period: limiter.Day}, limiter.Quota{}},
		{"budget", func(s *Settings) { s.Budget = nil }, func(t *Tier) any { return t.budget },
			limiter.Limits{Quota: limiter.Quota{N: 100_000_000, Period: limiter.Month}},
			limiter.Limits{Quota: limiter.Quota{N: 50_000_000, Period: limiter.Month}}, limiter.Limits{}},
		{"models", func(s *Settings) { s.Models = nil }, func(t *Tier) any {
			return []bool{t.Allows("vigthoria-fast-1"), t.Allows("vigthoria-pro-1"), t.Allows("other")}
		},
			[]bool{true, true, false}, []bool{true, false, false}, []bool{true, true, true}},
		{"max_tokens", func(s *Settings) { s.MaxTokens = nil }, func(t *Tier) any { return t.MaxTokens },
			int64(4096), int64(2048), int64(0)},
	}
	empty := &Tier{}
	for _, f := range fields {
		cleared := *keySet
		f.clear(&cleared)
		cases := []struct {
			name     string
			tier     *Tier
			settings *Settings
			want     any
		}{
			{"tier only", tierSet, &Settings{Origins: []string{"https://a.example"}}, f.tier},
			{"no settings", tierSet, nil, f.tier},
			{"key only", empty, keySet, f.key},
			{"both", tierSet, keySet, f.key},
			{"cleared", tierSet, &cleared, f.tier},
			{"neither", empty, &cleared, f.none},
		}
		for _, c := range cases {
			t.Run(f.name+"/"+c.name, func(t *testing.T) {
				h := tierPolicy(t, map[string]*Tier{"t": c.tier})
				got := h.TierFor("t", c.settings)
				if got == nil {
					t.Fatal("tierFor = nil")
				}
				if v := f.get(got); !reflect.DeepEqual(v, c.want) {
					t.Errorf("%s = %v, want %v", f.name, v, c.want)
				}
			})
		}
	}
}

// tierPolicy is a Policy of copies of tiers.
func tierPolicy(t *testing.T, tiers map[string]*Tier) *Policy {
	t.Helper()
	cfg := Config{Tiers: make(map[string]*Tier), Currency: DefaultCurrency, Unpriced: UnpricedRefuse, Logger: zap.NewNop()}
	for name, tier := range tiers {
		c := *tier
		cfg.Tiers[name] = &c
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestTierForCaches: no settings give the configured tier itself; the
// same settings pointer gives the same merged tier without allocating;
// new settings (a change) give a new one; an unknown tier gives nil.
func TestTierForCaches(t *testing.T) {
	h := tierPolicy(t, map[string]*Tier{"pro": {Requests: &TierRate{N: 100, Window: caddy.Duration(time.Minute)}}})
	if h.TierFor("pro", nil) != h.cfg.Tiers["pro"] {
		t.Error("without settings, tierFor is not the configured tier")
	}
	s1 := &Settings{Requests: &Rate{N: 2, Window: time.Hour}}
	first := h.TierFor("pro", s1)
	if first == h.cfg.Tiers["pro"] || h.TierFor("pro", s1) != first {
		t.Fatal("the same settings did not give the same merged tier")
	}
	if n := testing.AllocsPerRun(1000, func() { h.TierFor("pro", s1) }); n != 0 {
		t.Errorf("tierFor on a cache hit: %v allocations, want 0", n)
	}
	s2 := &Settings{Requests: &Rate{N: 3, Window: time.Hour}}
	if got := h.TierFor("pro", s2); got.limits.Requests.N != 3 || first.limits.Requests.N != 2 {
		t.Errorf("changed settings: got %d, first now %d", got.limits.Requests.N, first.limits.Requests.N)
	}
	if h.cfg.Tiers["pro"].limits.Requests.N != 100 {
		t.Error("a merge changed the configured tier")
	}
	if h.TierFor("gone", s1) != nil {
		t.Error("an unknown tier gave a tier")
	}
}

// TestMintedTierIsTheIntersection: the user of a minted token may use a
// model only when its token's tier, the minting key's tier with the
// key's settings, and the token's own models all allow it; its cap is
// the lower one, which is also what a request without one gets; its
// limits stay its own tier's; the key's origins bind it. Settings that
// change (a new pointer) narrow the same token at once, and a cached
// tier costs no allocation.
func TestMintedTierIsTheIntersection(t *testing.T) {
	h := tierPolicy(t, map[string]*Tier{
		"web":    {Requests: &TierRate{N: 10, Window: caddy.Duration(time.Minute)}, Models: []string{"vigthoria-*"}, MaxTokens: 400},
		"open":   {},
		"app":    {},
		"narrow": {Models: []string{"vigthoria-fast-*", "other-*"}, MaxTokens: 100},
	})
	// A minted token's user: its token's tier, the minting key's tier,
	// and the token's own models.
	type token struct {
		Tier   string
		Minted struct {
			KeyTier, ModelsKey string
			Models             []string
		}
	}
	narrow := func(own, minter *Tier, c token) *Tier {
		return h.Narrow(own, minter, c.Minted.Models, c.Minted.ModelsKey)
	}
	maxTok := func(n int64) *int64 { return &n }
	minted := func(tier, keyTier string, models ...string) token {
		c := token{Tier: tier}
		c.Minted.KeyTier = keyTier
		if models != nil {
			c.Minted.Models, c.Minted.ModelsKey = models, proxy.FilterKey(models)
		}
		return c
	}
	models := []string{"vigthoria-fast-1", "vigthoria-pro-1", "other-1", "vigthoria-embed-1"}
	for _, tc := range []struct {
		name     string
		client   token
		settings *Settings
		allowed  []bool // of models
		cap      int64
		origins  bool // https://evil.example is refused
	}{
		{"nothing narrows", minted("open", "app"), nil, []bool{true, true, true, true}, 0, false},
		{"the token's tier", minted("web", "app"), nil, []bool{true, true, false, true}, 400, false},
		{"the key's tier", minted("open", "narrow"), nil, []bool{true, false, true, false}, 100, false},
		{"the key's settings", minted("open", "app"), &Settings{Models: []string{"vigthoria-pro-*"}, MaxTokens: maxTok(50)},
			[]bool{false, true, false, false}, 50, false},
		{"the key's settings over its tier", minted("open", "narrow"), &Settings{Models: []string{"vigthoria-*"}, MaxTokens: maxTok(700)},
			[]bool{true, true, false, true}, 700, false},
		{"the token's models", minted("open", "app", "vigthoria-embed-*"), nil, []bool{false, false, false, true}, 0, false},
		{"all three", minted("web", "narrow", "*-1"), nil, []bool{true, false, false, false}, 100, false},
		{"the token's models wider than the key's", minted("open", "narrow", "*"), nil, []bool{true, false, true, false}, 100, false},
		{"the key's origins", minted("open", "app"), &Settings{Origins: []string{"https://app.example"}}, []bool{true, true, true, true}, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			minter := h.TierFor(tc.client.Minted.KeyTier, tc.settings)
			got := narrow(h.cfg.Tiers[tc.client.Tier], minter, tc.client)
			for i, m := range models {
				if got.Allows(m) != tc.allowed[i] {
					t.Errorf("allows(%s) = %v, want %v", m, got.Allows(m), tc.allowed[i])
				}
				if f := got.ModelFilter(); f.Allows != nil && f.Allows(m) != tc.allowed[i] || f.Allows == nil && !tc.allowed[i] {
					t.Errorf("the models list filter disagrees on %s", m)
				}
			}
			if got.MaxTokens != tc.cap {
				t.Errorf("max_tokens = %d, want %d", got.MaxTokens, tc.cap)
			}
			if got.limits != h.cfg.Tiers[tc.client.Tier].limits || got.minter != minter {
				t.Errorf("limits %+v, minter %p: want the token's tier's and the key's %p", got.limits, got.minter, minter)
			}
			r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil)
			r.Header.Set("Origin", "https://evil.example")
			if got.AllowsOrigin(r.Header.Get("Origin")) == tc.origins {
				t.Errorf("from another origin: allowed %v, want %v", !tc.origins, !tc.origins)
			}
		})
	}

	// Models lists: one per policy, never the same key for two; a user
	// whom nothing narrows shares its tier's.
	keys := map[string]bool{h.cfg.Tiers["open"].modelsKey: true, h.cfg.Tiers["web"].modelsKey: true}
	for _, c := range []token{minted("open", "app", "a"), minted("open", "narrow"), minted("open", "narrow", "a"), minted("web", "narrow", "a"), minted("web", "app", "a")} {
		k := narrow(h.cfg.Tiers[c.Tier], h.TierFor(c.Minted.KeyTier, nil), c).ModelFilter().Key
		if keys[k] {
			t.Errorf("models cache key %q given twice", k)
		}
		keys[k] = true
	}
	if k := narrow(h.cfg.Tiers["web"], h.cfg.Tiers["app"], minted("web", "app")).ModelFilter().Key; k != h.cfg.Tiers["web"].modelsKey {
		t.Errorf("a user whom nothing narrows beyond its tier has the models list %q, want its tier's %q", k, h.cfg.Tiers["web"].modelsKey)
	}

	// Changed settings are a new pointer: a new tier, for the same token.
	c := minted("web", "app")
	s1 := &Settings{MaxTokens: maxTok(50)}
	first := narrow(h.cfg.Tiers["web"], h.TierFor("app", s1), c)
	if n := testing.AllocsPerRun(1000, func() { narrow(h.cfg.Tiers["web"], h.TierFor("app", s1), c) }); n != 0 {
		t.Errorf("a cached minted tier: %v allocations, want 0", n)
	}
	s2 := &Settings{MaxTokens: maxTok(20)}
	if got := narrow(h.cfg.Tiers["web"], h.TierFor("app", s2), c); got.MaxTokens != 20 || first.MaxTokens != 50 {
		t.Errorf("changed settings: max_tokens %d, the first now %d; want 20 and 50", got.MaxTokens, first.MaxTokens)
	}
	if h.cfg.Tiers["web"].MaxTokens != 400 || h.cfg.Tiers["web"].minter != nil {
		t.Error("narrowing changed the configured tier")
	}
}
