package vigthoria

import (
	"reflect"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/keystore"
	"github.com/vigthoria/caddy-vigthoria/limiter"
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
	keySet := &keystore.Settings{
		Requests:   &keystore.Rate{N: 100, Window: time.Minute},
		Tokens:     &keystore.Rate{N: 200_000, Window: time.Hour},
		Concurrent: &conc,
		Quota:      &keystore.Amount{N: 10_000_000, Period: "day"},
		Budget:     &keystore.Amount{N: 50_000_000, Period: "month"},
		Models:     []string{"vigthoria-fast-*"},
		MaxTokens:  &maxTok,
	}
	type field struct {
		name      string
		clear     func(s *keystore.Settings)
		get       func(t *Tier) any
		tier, key any // the effective value from the tier alone, from the key
		none      any // neither sets it
	}
	fields := []field{
		{"requests", func(s *keystore.Settings) { s.Requests = nil }, func(t *Tier) any { return t.limits.Requests },
			limiter.Rate{N: 600, Window: time.Minute}, limiter.Rate{N: 100, Window: time.Minute}, limiter.Rate{}},
		{"tokens", func(s *keystore.Settings) { s.Tokens = nil }, func(t *Tier) any { return t.limits.Tokens },
			limiter.Rate{N: 400_000, Window: time.Minute, Burst: 1000}, limiter.Rate{N: 200_000, Window: time.Hour}, limiter.Rate{}},
		{"concurrent", func(s *keystore.Settings) { s.Concurrent = nil }, func(t *Tier) any { return t.limits.Concurrent },
			20, 5, 0},
		{"quota", func(s *keystore.Settings) { s.Quota = nil }, func(t *Tier) any { return t.limits.Quota },
			limiter.Quota{N: 50_000_000, Period: limiter.Month}, limiter.Quota{N: 10_000_000, Period: limiter.Day}, limiter.Quota{}},
		{"budget", func(s *keystore.Settings) { s.Budget = nil }, func(t *Tier) any { return t.budget },
			limiter.Limits{Quota: limiter.Quota{N: 100_000_000, Period: limiter.Month}},
			limiter.Limits{Quota: limiter.Quota{N: 50_000_000, Period: limiter.Month}}, limiter.Limits{}},
		{"models", func(s *keystore.Settings) { s.Models = nil }, func(t *Tier) any {
			return []bool{t.allows("vigthoria-fast-1"), t.allows("vigthoria-pro-1"), t.allows("other")}
		},
			[]bool{true, true, false}, []bool{true, false, false}, []bool{true, true, true}},
		{"max_tokens", func(s *keystore.Settings) { s.MaxTokens = nil }, func(t *Tier) any { return t.MaxTokens },
			int64(4096), int64(2048), int64(0)},
	}
	empty := &Tier{}
	for _, f := range fields {
		cleared := *keySet
		f.clear(&cleared)
		cases := []struct {
			name     string
			tier     *Tier
			settings *keystore.Settings
			want     any
		}{
			{"tier only", tierSet, &keystore.Settings{Origins: []string{"https://a.example"}}, f.tier},
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
	s1 := &keystore.Settings{Requests: &keystore.Rate{N: 2, Window: time.Hour}}
	first := h.tierFor("pro", s1)
	if first == h.Tiers["pro"] || h.tierFor("pro", s1) != first {
		t.Fatal("the same settings did not give the same merged tier")
	}
	if n := testing.AllocsPerRun(1000, func() { h.tierFor("pro", s1) }); n != 0 {
		t.Errorf("tierFor on a cache hit: %v allocations, want 0", n)
	}
	s2 := &keystore.Settings{Requests: &keystore.Rate{N: 3, Window: time.Hour}}
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
