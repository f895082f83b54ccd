package vigthoria

import (
	"net/http"
	"net/http/httptest"
	"reflect"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/keystore"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// TestTierForPrecedence: each field of a key's settings replaces its
// tier's field of the same name; an unset field follows the tier, and
// a tier without the field gives none.
func TestTierForPrecedence(t *testing.T) {
	tierSet := &Tier{
		Requests:   &Rate{N: 600, Window: caddy.Duration(time.Minute)},
		Tokens:     &Rate{N: 400_000, Window: caddy.Duration(time.Minute), Burst: 1000},
		Concurrent: 20,
		Quota:      &Quota{N: 50_000_000, Period: "month"},
		Budget:     &Budget{Amount: "100", Period: "month"},
		Models:     []string{"vigthoria-*"},
		MaxTokens:  4096,
	}
	conc, maxTok := 5, int64(2048)
	keySet := &policy.Settings{
		Requests:   &policy.Rate{N: 100, Window: time.Minute},
		Tokens:     &policy.Rate{N: 200_000, Window: time.Hour},
		Concurrent: &conc,
		Quota:      &policy.Amount{N: 10_000_000, Period: "day"},
		Budget:     &policy.Amount{N: 50_000_000, Period: "month"},
		Models:     []string{"vigthoria-fast-*"},
		MaxTokens:  &maxTok,
	}
	type field struct {
		name      string
		clear     func(s *policy.Settings)
		get       func(t *Tier) any
		tier, key any // the effective value from the tier alone, from the key
		none      any // neither sets it
	}
	fields := []field{
		{"requests", func(s *policy.Settings) { s.Requests = nil }, func(t *Tier) any { return t.limits.Requests },
			limiter.Rate{N: 600, Window: time.Minute}, limiter.Rate{N: 100, Window: time.Minute}, limiter.Rate{}},
		{"tokens", func(s *policy.Settings) { s.Tokens = nil }, func(t *Tier) any { return t.limits.Tokens },
			limiter.Rate{N: 400_000, Window: time.Minute, Burst: 1000}, limiter.Rate{N: 200_000, Window: time.Hour}, limiter.Rate{}},
		{"concurrent", func(s *policy.Settings) { s.Concurrent = nil }, func(t *Tier) any { return t.limits.Concurrent },
			20, 5, 0},
		{"quota", func(s *policy.Settings) { s.Quota = nil }, func(t *Tier) any { return t.limits.Quota },
			limiter.Quota{N: 50_000_000, Period: limiter.Month}, limiter.Quota{N: 10_000_000, Period: limiter.Day}, limiter.Quota{}},
		{"budget", func(s *policy.Settings) { s.Budget = nil }, func(t *Tier) any { return t.budget },
			limiter.Limits{Quota: limiter.Quota{N: 100_000_000, Period: limiter.Month}},
			limiter.Limits{Quota: limiter.Quota{N: 50_000_000, Period: limiter.Month}}, limiter.Limits{}},
		{"models", func(s *policy.Settings) { s.Models = nil }, func(t *Tier) any {
			return []bool{t.allows("vigthoria-fast-1"), t.allows("vigthoria-pro-1"), t.allows("other")}
		},
			[]bool{true, true, false}, []bool{true, false, false}, []bool{true, true, true}},
		{"max_tokens", func(s *policy.Settings) { s.MaxTokens = nil }, func(t *Tier) any { return t.MaxTokens },
			int64(4096), int64(2048), int64(0)},
	}
	empty := &Tier{}
	for _, f := range fields {
		cleared := *keySet
		f.clear(&cleared)
		cases := []struct {
			name     string
			tier     *Tier
			settings *policy.Settings
			want     any
		}{
			{"tier only", tierSet, &policy.Settings{Origins: []string{"https://a.example"}}, f.tier},
			{"no settings", tierSet, nil, f.tier},
			{"key only", empty, keySet, f.key},
			{"both", tierSet, keySet, f.key},
			{"cleared", tierSet, &cleared, f.tier},
			{"neither", empty, &cleared, f.none},
		}
		for _, c := range cases {
			t.Run(f.name+"/"+c.name, func(t *testing.T) {
				h := tierHandler(t, map[string]*Tier{"t": c.tier})
				got := h.tierFor("t", c.settings)
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

// tierHandler is a Handler with tiers, provisioned, for tierFor.
func tierHandler(t *testing.T, tiers map[string]*Tier) *Handler {
	t.Helper()
	h := &Handler{Tiers: make(map[string]*Tier), logger: zap.NewNop(), keyTiers: newTierCache()}
	for name, tier := range tiers {
		c := *tier
		if err := c.provision(name); err != nil {
			t.Fatal(err)
		}
		h.Tiers[name] = &c
	}
	return h
}

// TestTierForCaches: no settings give the configured tier itself; the
// same settings pointer gives the same merged tier without allocating;
// new settings (a change) give a new one; an unknown tier gives nil.
func TestTierForCaches(t *testing.T) {
	h := tierHandler(t, map[string]*Tier{"pro": {Requests: &Rate{N: 100, Window: caddy.Duration(time.Minute)}}})
	if h.tierFor("pro", nil) != h.Tiers["pro"] {
		t.Error("without settings, tierFor is not the configured tier")
	}
	s1 := &policy.Settings{Requests: &policy.Rate{N: 2, Window: time.Hour}}
	first := h.tierFor("pro", s1)
	if first == h.Tiers["pro"] || h.tierFor("pro", s1) != first {
		t.Fatal("the same settings did not give the same merged tier")
	}
	if n := testing.AllocsPerRun(1000, func() { h.tierFor("pro", s1) }); n != 0 {
		t.Errorf("tierFor on a cache hit: %v allocations, want 0", n)
	}
	s2 := &policy.Settings{Requests: &policy.Rate{N: 3, Window: time.Hour}}
	if got := h.tierFor("pro", s2); got.limits.Requests.N != 3 || first.limits.Requests.N != 2 {
		t.Errorf("changed settings: got %d, first now %d", got.limits.Requests.N, first.limits.Requests.N)
	}
	if h.Tiers["pro"].limits.Requests.N != 100 {
		t.Error("a merge changed the configured tier")
	}
	if h.tierFor("gone", s1) != nil {
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
	h := tierHandler(t, map[string]*Tier{
		"web":    {Requests: &Rate{N: 10, Window: caddy.Duration(time.Minute)}, Models: []string{"vigthoria-*"}, MaxTokens: 400},
		"open":   {},
		"app":    {},
		"narrow": {Models: []string{"vigthoria-fast-*", "other-*"}, MaxTokens: 100},
	})
	maxTok := func(n int64) *int64 { return &n }
	minted := func(tier, keyTier string, models ...string) keystore.Client {
		m := &keystore.Minted{KeyID: "key_x", KeyTier: keyTier}
		if models != nil {
			m.Models, m.ModelsKey = models, proxy.FilterKey(models)
		}
		return keystore.Client{ID: "mint:key_x:alice", Tier: tier, Minted: m}
	}
	models := []string{"vigthoria-fast-1", "vigthoria-pro-1", "other-1", "vigthoria-embed-1"}
	for _, tc := range []struct {
		name     string
		client   keystore.Client
		settings *policy.Settings
		allowed  []bool // of models
		cap      int64
		origins  bool // https://evil.example is refused
	}{
		{"nothing narrows", minted("open", "app"), nil, []bool{true, true, true, true}, 0, false},
		{"the token's tier", minted("web", "app"), nil, []bool{true, true, false, true}, 400, false},
		{"the key's tier", minted("open", "narrow"), nil, []bool{true, false, true, false}, 100, false},
		{"the key's settings", minted("open", "app"), &policy.Settings{Models: []string{"vigthoria-pro-*"}, MaxTokens: maxTok(50)},
			[]bool{false, true, false, false}, 50, false},
		{"the key's settings over its tier", minted("open", "narrow"), &policy.Settings{Models: []string{"vigthoria-*"}, MaxTokens: maxTok(700)},
			[]bool{true, true, false, true}, 700, false},
		{"the token's models", minted("open", "app", "vigthoria-embed-*"), nil, []bool{false, false, false, true}, 0, false},
		{"all three", minted("web", "narrow", "*-1"), nil, []bool{true, false, false, false}, 100, false},
		{"the token's models wider than the key's", minted("open", "narrow", "*"), nil, []bool{true, false, true, false}, 100, false},
		{"the key's origins", minted("open", "app"), &policy.Settings{Origins: []string{"https://app.example"}}, []bool{true, true, true, true}, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			minter := h.tierFor(tc.client.Minted.KeyTier, tc.settings)
			got := h.narrowTier(h.Tiers[tc.client.Tier], minter, tc.client)
			for i, m := range models {
				if got.allows(m) != tc.allowed[i] {
					t.Errorf("allows(%s) = %v, want %v", m, got.allows(m), tc.allowed[i])
				}
				if f := got.modelFilter(); f.Allows != nil && f.Allows(m) != tc.allowed[i] || f.Allows == nil && !tc.allowed[i] {
					t.Errorf("the models list filter disagrees on %s", m)
				}
			}
			if got.MaxTokens != tc.cap {
				t.Errorf("max_tokens = %d, want %d", got.MaxTokens, tc.cap)
			}
			if got.limits != h.Tiers[tc.client.Tier].limits || got.minter != minter {
				t.Errorf("limits %+v, minter %p: want the token's tier's and the key's %p", got.limits, got.minter, minter)
			}
			r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil)
			r.Header.Set("Origin", "https://evil.example")
			if originAllowed(r, got) == tc.origins {
				t.Errorf("from another origin: allowed %v, want %v", !tc.origins, !tc.origins)
			}
		})
	}

	// Models lists: one per policy, never the same key for two; a user
	// whom nothing narrows shares its tier's.
	keys := map[string]bool{h.Tiers["open"].modelsKey: true, h.Tiers["web"].modelsKey: true}
	for _, c := range []keystore.Client{minted("open", "app", "a"), minted("open", "narrow"), minted("open", "narrow", "a"), minted("web", "narrow", "a"), minted("web", "app", "a")} {
		k := h.narrowTier(h.Tiers[c.Tier], h.tierFor(c.Minted.KeyTier, nil), c).modelFilter().Key
		if keys[k] {
			t.Errorf("models cache key %q given twice", k)
		}
		keys[k] = true
	}
	if k := h.narrowTier(h.Tiers["web"], h.Tiers["app"], minted("web", "app")).modelFilter().Key; k != h.Tiers["web"].modelsKey {
		t.Errorf("a user whom nothing narrows beyond its tier has the models list %q, want its tier's %q", k, h.Tiers["web"].modelsKey)
	}

	// Changed settings are a new pointer: a new tier, for the same token.
	c := minted("web", "app")
	s1 := &policy.Settings{MaxTokens: maxTok(50)}
	first := h.narrowTier(h.Tiers["web"], h.tierFor("app", s1), c)
	if n := testing.AllocsPerRun(1000, func() { h.narrowTier(h.Tiers["web"], h.tierFor("app", s1), c) }); n != 0 {
		t.Errorf("a cached minted tier: %v allocations, want 0", n)
	}
	s2 := &policy.Settings{MaxTokens: maxTok(20)}
	if got := h.narrowTier(h.Tiers["web"], h.tierFor("app", s2), c); got.MaxTokens != 20 || first.MaxTokens != 50 {
		t.Errorf("changed settings: max_tokens %d, the first now %d; want 20 and 50", got.MaxTokens, first.MaxTokens)
	}
	if h.Tiers["web"].MaxTokens != 400 || h.Tiers["web"].minter != nil {
		t.Error("narrowing changed the configured tier")
	}
}
