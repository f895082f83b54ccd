package vigthoria

import (
	"testing"

	"github.com/vigthoria/caddy-vigthoria/keystore"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"go.uber.org/zap"
)

// TestChargeForCosts: what a request is charged carries its cost at its
// model's price, the reservation's when the usage was not believed, and
// nothing for a model without a price.
func TestChargeForCosts(t *testing.T) {
	h := &Handler{logger: zap.NewNop()}
	var err error
	h.policy, err = policy.New(policy.Config{Currency: policy.DefaultCurrency, Unpriced: policy.UnpricedRefuse,
		Prices: []*policy.Price{{Model: "vigthoria-fast-*", Input: "0.10", Output: "0.40"}}})
	if err != nil {
		t.Fatal(err)
	}
	reported := proxy.AnswerUsage{Status: 200, Reported: true, PromptTokens: 1200, CompletionTokens: 345}
	for _, tc := range []struct {
		name  string
		model string
		u     proxy.AnswerUsage
		want  keystore.Tokens
	}{
		{"priced", "vigthoria-fast-1", reported, keystore.Tokens{Prompt: 1200, Completion: 345, Cost: 258}}, // 120 + 138
		{"unpriced", "other", reported, keystore.Tokens{Prompt: 1200, Completion: 345}},
		{"absurd: the reservation", "vigthoria-fast-1", proxy.AnswerUsage{Status: 200, Reported: true, Garbled: "x"},
			keystore.Tokens{Prompt: 100, Completion: 4000, Cost: 1610}}, // 10 + 1600
	} {
		if got := h.chargeFor("key_x", "pro", tc.model, &tc.u, 4100, 400); got != tc.want {
			t.Errorf("%s: charged %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
