package policy

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"regexp"
)

// DefaultCurrency labels costs when the config names no currency.
const DefaultCurrency = "USD"

// The ways to treat a model that no price matches; see Handler.Unpriced.
const (
	UnpricedRefuse = "refuse"
	UnpricedFree   = "free"
)

// pricedTokens is the number of tokens a price is for.
const pricedTokens = 1_000_000

// maxPrice bounds a price: a million units of the currency per million
// tokens, far above any model's, in micro-units. A larger figure is a
// typo, and bounding it keeps every product of tokens and prices in 128
// bits.
const maxPrice = 1_000_000 * Micros

// currencyLabel is a currency's code (USD) or a short label of letters
// and currency signs (credits, €).
var currencyLabel = regexp.MustCompile(`^[\p{L}\p{Sc}]{1,12}$`)

// Price is what the models a glob matches cost, per million tokens, in
// units of the currency.
type Price struct {
	// The models priced, as a model glob, e.g. "vigthoria-fast-*": '*'
	// matches any run of characters, '/' included, so "*" prices every
	// model (see keys.MatchModel).
	Model string `json:"model"`

	// The price of a million prompt tokens: a decimal with at most six
	// places, such as "0.10" (a JSON number, 0.10, is read as written
	// too), never negative, at most 1000000. Required.
	Input Decimal `json:"input"`

	// The price of a million completion tokens, reasoning tokens
	// included, in the same form as input. Default: 0 (a model that
	// answers with no text, such as an embedding model).
	Output Decimal `json:"output,omitempty"`
}

// Decimal is a decimal number as its text. It is a string in JSON, so
// that no JSON tool on the way rounds it through a float; a JSON number
// is taken as its text too.
type Decimal string

// UnmarshalJSON reads a string, or the text of a number.
func (d *Decimal) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		return json.Unmarshal(b, (*string)(d))
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return err
	}
	*d = Decimal(n)
	return nil
}

// ModelPrice is a model's price per million tokens, in micro-units of
// the currency.
type ModelPrice struct{ input, output int64 }

// pricedGlob is a configured price, parsed.
type pricedGlob struct {
	glob    string
	literal bool // glob has no meta characters: compared as a string
	price   ModelPrice
}

// parse checks a configured price and converts it to micro-units.
func (p *Price) parse() (pricedGlob, error) {
	if p.Model == "" {
		return pricedGlob{}, errors.New("a price needs a model glob")
	}
	if err := CheckGlob(p.Model); err != nil {
		return pricedGlob{}, fmt.Errorf("invalid model glob '%s': %v", p.Model, err)
	}
	if p.Input == "" {
		return pricedGlob{}, errors.New("input price is required")
	}
	in, err := parseMicros(string(p.Input))
	if err != nil {
		return pricedGlob{}, fmt.Errorf("input: %w", err)
	}
	var out int64
	if p.Output != "" {
		if out, err = parseMicros(string(p.Output)); err != nil {
			return pricedGlob{}, fmt.Errorf("output: %w", err)
		}
	}
	return pricedGlob{
		glob:    p.Model,
		literal: IsLiteralGlob(p.Model),
		price:   ModelPrice{input: in, output: out},
	}, nil
}

// parseMicros reads a price, a decimal number of units such as 0.10, as
// micro-units per million tokens, exactly.
func parseMicros(s string) (int64, error) {
	n, err := ParseMoney(s, maxPrice)
	if err != nil {
		return 0, fmt.Errorf("price %w", err)
	}
	return n, nil
}

// Price returns the model's prices per 1M tokens in micro-units, and
// whether it has one: the first configured glob that matches it prices
// it. A model no glob matches has none, unless unpriced is "free", when
// its price is zero. It allocates nothing.
func (p *Policy) Price(model string) (ModelPrice, bool) {
	for i := range p.prices {
		g := &p.prices[i]
		if g.literal {
			if g.glob == model {
				return g.price, true
			}
		} else if MatchModel(g.glob, model) {
			return g.price, true
		}
	}
	return ModelPrice{}, p.cfg.Unpriced == UnpricedFree
}

// Affordable is how many completion tokens n micro-units pay for beside
// prompt tokens, exactly as Cost counts them: the most t with
// Cost(prompt, t) <= n. It is negative when the prompt alone costs more
// than n, and math.MaxInt64 when output is free or t does not fit an
// int64.
func (p ModelPrice) Affordable(n, prompt int64) int64 {
	// cost(prompt, t) <= n  <=>  prompt*input + t*output <= n*10^6.
	aHi, aLo := bits.Mul64(uint64(max(n, 0)), pricedTokens)
	bHi, bLo := bits.Mul64(uint64(max(prompt, 0)), uint64(p.input))
	if aHi < bHi || aHi == bHi && aLo < bLo {
		return -1
	}
	if p.output == 0 {
		return math.MaxInt64
	}
	lo, borrow := bits.Sub64(aLo, bLo, 0)
	hi, _ := bits.Sub64(aHi, bHi, borrow)
	if hi >= uint64(p.output) {
		return math.MaxInt64
	}
	q, _ := bits.Div64(hi, lo, uint64(p.output))
	return int64(min(q, math.MaxInt64))
}

// Cost is what a request's tokens cost in micro-units, rounded up to a
// whole micro-unit (never undercharging). It is exact: the products are
// taken in 128 bits. It saturates at the largest int64, and is never
// negative: a negative count costs nothing.
func (p ModelPrice) Cost(prompt, completion int64) int64 {
	hi1, lo1 := bits.Mul64(uint64(max(prompt, 0)), uint64(p.input))
	hi2, lo2 := bits.Mul64(uint64(max(completion, 0)), uint64(p.output))
	lo, carry := bits.Add64(lo1, lo2, 0)
	hi, _ := bits.Add64(hi1, hi2, carry) // both below 2^103: no overflow
	if hi >= pricedTokens {              // the quotient would not fit 64 bits
		return math.MaxInt64
	}
	q, r := bits.Div64(hi, lo, pricedTokens)
	if q >= math.MaxInt64 {
		return math.MaxInt64
	}
	if r > 0 {
		q++
	}
	return int64(q)
}

// ValidCurrency reports whether s may label costs: a code such as USD,
// or a short label of letters or currency signs.
func ValidCurrency(s string) bool { return currencyLabel.MatchString(s) }

// Check checks a configured price.
func (p *Price) Check() error {
	_, err := p.parse()
	return err
}
