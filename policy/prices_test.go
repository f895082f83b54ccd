package policy

import (
	"cmp"
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"testing"
)

func TestParseMicros(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  string // a part of the error; "" for none
	}{
		{"0.10", 100_000, ""},
		{"3", 3_000_000, ""},
		{"3.00", 3_000_000, ""},
		{"15.000001", 15_000_001, ""},
		{"0", 0, ""},
		{"0.000001", 1, ""},
		{"007.5", 7_500_000, ""},
		{"1000000", 1_000_000_000_000, ""},
		{"1000000.000001", 0, "more than 1000000"},
		{"99999999999999999999999", 0, "more than 1000000"},
		{"0.0000001", 0, "more than six decimal places"},
		{"-1", 0, "negative"},
		{"-0.5", 0, "negative"},
		{"1e3", 0, "not a decimal number"},
		{"", 0, "not a decimal number"},
		{"abc", 0, "not a decimal number"},
		{".5", 0, "not a decimal number"},
		{"5.", 0, "not a decimal number"},
		{"+1", 0, "not a decimal number"},
		{"1.2.3", 0, "not a decimal number"},
		{" 1", 0, "not a decimal number"},
	} {
		got, err := parseMicros(tc.in)
		switch {
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("parseMicros(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("parseMicros(%q) = %d, %v; want an error saying %q", tc.in, got, err, tc.err)
		}
	}
}

// configOf is the Config of a JSON config's prices, currency and
// unpriced, with the handler's defaults.
func configOf(t *testing.T, config string) Config {
	t.Helper()
	var c struct {
		Prices   []*Price `json:"prices"`
		Currency string   `json:"currency"`
		Unpriced string   `json:"unpriced"`
	}
	if err := json.Unmarshal([]byte(config), &c); err != nil {
		t.Fatal(err)
	}
	return Config{Prices: c.Prices, Currency: cmp.Or(c.Currency, DefaultCurrency), Unpriced: cmp.Or(c.Unpriced, UnpricedRefuse)}
}

// pricedPolicy is a policy made with the prices of a JSON config.
func pricedPolicy(t *testing.T, config string) *Policy {
	t.Helper()
	p, err := New(configOf(t, config))
	if err != nil {
		t.Fatalf("provisioning %s: %v", config, err)
	}
	return p
}

func TestPriceFirstMatchWins(t *testing.T) {
	h := pricedPolicy(t, `{"prices": [
		{"model": "vigthoria-fast-1", "input": "1", "output": "2"},
		{"model": "vigthoria-fast-*", "input": 0.10, "output": 0.40},
		{"model": "vigthoria-*", "input": 3, "output": 15},
		{"model": "vigthoria-embed-*", "input": 0.02}
	]}`)
	for _, tc := range []struct {
		model string
		want  ModelPrice
		ok    bool
	}{
		{"vigthoria-fast-1", ModelPrice{1_000_000, 2_000_000}, true},   // the literal, listed first
		{"vigthoria-fast-2", ModelPrice{100_000, 400_000}, true},       // the first glob
		{"vigthoria-embed-1", ModelPrice{3_000_000, 15_000_000}, true}, // vigthoria-* comes before
		{"vigthoria-fast-1/x", ModelPrice{100_000, 400_000}, true},     // * takes '/' too
		{"other", ModelPrice{}, false},
		{"", ModelPrice{}, false},
	} {
		got, ok := h.Price(tc.model)
		if ok != tc.ok || (ok && got != tc.want) || (!ok && got != ModelPrice{}) {
			t.Errorf("price(%q) = %+v, %v; want %+v, %v", tc.model, got, ok, tc.want, tc.ok)
		}
	}

	free := pricedPolicy(t, `{"unpriced": "free", "currency": "EUR", "prices": [{"model": "m", "input": "1"}]}`)
	if p, ok := free.Price("other"); !ok || p != (ModelPrice{}) {
		t.Errorf("with unpriced free, price of an unpriced model = %+v, %v; want zero, true", p, ok)
	}
}

// TestOneGlobRule: prices, tiers' models and minted tokens' models read
// a glob the same way, '*' matching '/' too: an operator's "*" is every
// model, org/model included, wherever it is written.
func TestOneGlobRule(t *testing.T) {
	for _, tc := range []struct {
		glob, model string
		want        bool
	}{
		{"*", "org/model", true},
		{"*", "vigthoria-fast-1", true},
		{"org/*", "org/team/model", true},
		{"vigthoria-*", "vigthoria-fast/1", true},
		{"vigthoria-fast-?", "vigthoria-fast-1", true},
		{"vigthoria-fast-?", "vigthoria-fast-10", false},
		{"gpt-[45]*", "gpt-4o", true},
		{"vigthoria-fast-1", "vigthoria-fast-1/x", false},
		{"org/*", "other/model", false},
	} {
		h := pricedPolicy(t, `{"prices": [{"model": `+strconv.Quote(tc.glob)+`, "input": "1"}]}`)
		_, priced := h.Price(tc.model)
		tier := &Tier{Models: []string{tc.glob}}
		if err := tier.provision("t"); err != nil {
			t.Fatal(err)
		}
		token := &Tier{tokenModels: []string{tc.glob}} // a minted token's own models
		minted := token.Allows(tc.model)
		if priced != tc.want || tier.Allows(tc.model) != tc.want || minted != tc.want || ValidGlob(tc.glob) != true {
			t.Errorf("glob %q, model %q: priced %v, tier allows %v, token allows %v; want %v for each",
				tc.glob, tc.model, priced, tier.Allows(tc.model), minted, tc.want)
		}
	}
}

// TestAffordable: the completion tokens a budget pays for beside a
// prompt are the most that cost counts within it.
func TestAffordable(t *testing.T) {
	prices := []ModelPrice{{10, 20}, {100_000, 400_000}, {3_000_000, 15_000_000}, {1, 1}, {0, 7}, {maxPrice, maxPrice}}
	for _, p := range prices {
		for _, n := range []int64{0, 1, 999, 1000, 10_000, 1_000_000, MaxMoney} {
			for _, prompt := range []int64{0, 1, 20, 5000, 2_500_000} {
				got := p.Affordable(n, prompt)
				switch {
				case got < 0:
					if p.Cost(prompt, 0) <= n {
						t.Errorf("%+v: affordable(%d, %d) = %d, but the prompt costs %d", p, n, prompt, got, p.Cost(prompt, 0))
					}
				case p.Cost(prompt, got) > n || got < math.MaxInt64 && p.Cost(prompt, got+1) <= n:
					t.Errorf("%+v: affordable(%d, %d) = %d: it costs %d, one more %d", p, n, prompt, got, p.Cost(prompt, got), p.Cost(prompt, got+1))
				}
			}
		}
	}
	if got := (ModelPrice{input: 10}).Affordable(1000, 20); got != math.MaxInt64 {
		t.Errorf("free output: affordable = %d, want MaxInt64", got)
	}
}

func TestPriceLookupAllocatesNothing(t *testing.T) {
	h := pricedPolicy(t, `{"prices": [
		{"model": "vigthoria-reasoning-*", "input": "3", "output": "15"},
		{"model": "vigthoria-fast-1", "input": "1"},
		{"model": "vigthoria-[ef]*-?", "input": "0.10", "output": "0.40"}
	]}`)
	model := "vigthoria-fast-2"
	if allocs := testing.AllocsPerRun(1000, func() {
		if p, ok := h.Price(model); !ok || p.Cost(1000, 500) != 300 {
			t.Fatal("wrong price")
		}
		h.Price("unpriced")
	}); allocs != 0 {
		t.Errorf("price allocated %v times a lookup, want 0", allocs)
	}
}

func TestCost(t *testing.T) {
	fast := ModelPrice{input: 100_000, output: 400_000} // 0.10 and 0.40 per 1M
	for _, tc := range []struct {
		name               string
		p                  ModelPrice
		prompt, completion int64
		want               int64
	}{
		{"exact", fast, 1_000_000, 1_000_000, 500_000},
		{"rounded up", fast, 1, 0, 1},       // 0.1 micro-units
		{"rounded up once", fast, 10, 3, 3}, // 1 + 1.2 = 2.2 micro-units
		{"whole", fast, 20, 20, 10},         // 2 + 8
		{"nothing used", fast, 0, 0, 0},
		{"free", ModelPrice{}, 5000, 5000, 0},
		{"negative counts cost nothing", fast, -10, -5, 0},
		{"one negative", fast, -10, 5, 2}, // 5 × 0.4 = 2
		{"largest prices", ModelPrice{maxPrice, maxPrice}, 3, 4, 7 * maxPrice / pricedTokens},
		{"saturates", ModelPrice{maxPrice, maxPrice}, math.MaxInt64, math.MaxInt64, math.MaxInt64},
		{"rounded up, large", ModelPrice{1, 0}, math.MaxInt64, 0, math.MaxInt64/pricedTokens + 1},
	} {
		if got := tc.p.Cost(tc.prompt, tc.completion); got != tc.want {
			t.Errorf("%s: cost(%d, %d) at %+v = %d, want %d", tc.name, tc.prompt, tc.completion, tc.p, got, tc.want)
		}
	}
}

func TestPricesRefused(t *testing.T) {
	for _, tc := range []struct{ config, err string }{
		{`{"prices": [{"model": "m"}]}`, "input price is required"},
		{`{"prices": [{"model": "", "input": 1}]}`, "needs a model glob"},
		{`{"prices": [{"model": "m[", "input": 1}]}`, "invalid model glob 'm['"},
		{`{"prices": [{"model": "m", "input": -1}]}`, "negative"},
		{`{"prices": [{"model": "m", "input": 1, "output": 1e3}]}`, "output: price '1e3'"},
		{`{"prices": [null]}`, "null"},
		{`{"prices": [{"model": "m", "input": "abc"}]}`, "input: price 'abc' is not a decimal"},
		{`{"currency": "US Dollar"}`, "invalid currency 'US Dollar'"},
		{`{"unpriced": "zero"}`, "invalid unpriced 'zero'"},
	} {
		if _, err := New(configOf(t, tc.config)); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: %v, want an error saying %q", tc.config, err, tc.err)
		}
	}
}

// TestChargeForCosts: what a request is charged carries its cost at its
// model's price, the reservation's when the usage was not believed, and
