package admission

import (
	"context"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// TestCharge: what each way an answer ends costs.
func TestCharge(t *testing.T) {
	left, leave := context.WithCancel(context.Background())
	leave()
	const reserve, prompt = 4100, 100
	for _, tc := range []struct {
		name                 string
		status               int
		stream, sent, gone   bool
		chunks               int64
		reported             bool
		wantPrompt, wantDone int64
	}{
		{"reported", 200, false, true, false, 0, true, 12, 34},
		{"upstream error", 500, false, true, false, 0, false, 0, 0},
		{"refused connection", 0, false, false, false, 0, false, 0, 0},
		{"upstream timeout, caller waiting", 0, false, true, false, 0, false, 0, 0},
		{"left before sending", 0, false, false, true, 0, false, 0, 0},
		// Cut after the caller left: the body's bytes (400) as the prompt,
		// and all the output reserved.
		{"left after sending, whole answer", 0, false, true, true, 0, false, 400, reserve - prompt},
		{"left after sending, stream", 0, true, true, true, 0, false, 400, reserve - prompt},
		{"left mid-stream", 200, true, true, true, 400, false, 400, reserve - prompt},
		{"left, and the upstream reported", 200, true, true, true, 400, true, 12, 34},
		{"stream cut by the upstream", 200, true, true, false, 400, false, prompt, 400},
		{"stream cut before output", 200, true, true, false, 0, false, prompt, 0},
		{"whole answer without usage", 200, false, true, false, 0, false, prompt, reserve - prompt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := &proxy.AnswerUsage{Status: tc.status, Stream: tc.stream, Chunks: tc.chunks, Prompt: prompt}
			if tc.reported {
				u.Reported, u.PromptTokens, u.CompletionTokens, u.HasPrompt, u.HasCompletion = true, 12, 34, true, true
				u.ChunksAtUsage = tc.chunks // reported at the end
			}
			u.Watch(context.Background())
			if tc.gone {
				u.Watch(left)
			}
			if tc.sent {
				u.MarkSent(true)
			}
			used, absurd, _ := Charge(u, reserve, 400)
			if used.Prompt != tc.wantPrompt || used.Completion != tc.wantDone || absurd {
				t.Errorf("charged %+v (absurd %v), want %d + %d", used, absurd, tc.wantPrompt, tc.wantDone)
			}
		})
	}
}

// TestChargeAbsurdUsage: usage that is no count, or more than any answer
// can use, costs the reservation; the details are kept when believed.
func TestChargeAbsurdUsage(t *testing.T) {
	const reserve, prompt = 4100, 100
	testCharges(t, true, []chargeCase{
		{"believed, with details", proxy.AnswerUsage{PromptTokens: 2048, CompletionTokens: 300, CachedTokens: 1920, ReasoningTokens: 256},
			reserve, ledger.Tokens{Prompt: 2048, Completion: 300, Cached: 1920, Reasoning: 256}, false},
		{"a prompt far over its estimate", proxy.AnswerUsage{PromptTokens: 1_000_000, CompletionTokens: 10},
			reserve, ledger.Tokens{Prompt: 1_000_000, Completion: 10}, false},
		{"garbled", proxy.AnswerUsage{CompletionTokens: 5, Garbled: `{"prompt_tokens":9e18,"completion_tokens":5}`},
			reserve, ledger.Tokens{Prompt: prompt, Completion: reserve - prompt}, true},
		{"a prompt past any context", proxy.AnswerUsage{PromptTokens: maxAnswerTokens + 1, CompletionTokens: 5},
			reserve, ledger.Tokens{Prompt: prompt, Completion: reserve - prompt}, true},
		{"cached tokens past any context", proxy.AnswerUsage{PromptTokens: 5, CachedTokens: 1 << 40},
			reserve, ledger.Tokens{Prompt: prompt, Completion: reserve - prompt}, true},
		{"a large reservation bounds instead", proxy.AnswerUsage{PromptTokens: 10, CompletionTokens: 128 * 200_000},
			128*200_000 + prompt, ledger.Tokens{Prompt: 10, Completion: 128 * 200_000}, false},
	})
}

// chargeCase is an answer's usage as reported, and what it must cost.
type chargeCase struct {
	name    string
	usage   proxy.AnswerUsage
	reserve int64
	want    ledger.Tokens
	absurd  bool
}

// testCharges charges each case's usage, reported with an answer of
// status 200 to a request whose prompt was estimated at 100 tokens (its
// body 400 bytes); both, when given is set, with its prompt and
// completion counts given.
func testCharges(t *testing.T, given bool, cases []chargeCase) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			u := tc.usage
			u.Status, u.Reported, u.Prompt = 200, true, 100
			if given {
				u.HasPrompt, u.HasCompletion = true, true
			}
			if used, absurd, _ := Charge(&u, tc.reserve, 400); used != tc.want || absurd != tc.absurd {
				t.Errorf("charged %+v (absurd %v), want %+v (absurd %v)", used, absurd, tc.want, tc.absurd)
			}
		})
	}
}

// TestChargeWhatUsageLeavesOut: a figure the usage object leaves out is
// no zero, and a stream's output after its usage object is not in it:
// neither is free.
func TestChargeWhatUsageLeavesOut(t *testing.T) {
	const reserve, prompt = 4100, 100
	testCharges(t, false, []chargeCase{
		{"no completion_tokens: total less the prompt", proxy.AnswerUsage{PromptTokens: 5, TotalTokens: 105, HasPrompt: true, HasTotal: true},
			reserve, ledger.Tokens{Prompt: 5, Completion: 100}, false},
		{"no completion_tokens nor total: the reservation's output", proxy.AnswerUsage{PromptTokens: 5, HasPrompt: true},
			reserve, ledger.Tokens{Prompt: 5, Completion: reserve - prompt}, false},
		{"a stream without completion_tokens: what it streamed", proxy.AnswerUsage{Stream: true, PromptTokens: 5, HasPrompt: true, Chunks: 40, ChunksAtUsage: 40},
			reserve, ledger.Tokens{Prompt: 5, Completion: 40}, false},
		{"no prompt_tokens: total less the output", proxy.AnswerUsage{CompletionTokens: 30, TotalTokens: 530, HasCompletion: true, HasTotal: true},
			reserve, ledger.Tokens{Prompt: 500, Completion: 30}, false},
		{"no prompt_tokens nor total: the prompt's estimate", proxy.AnswerUsage{CompletionTokens: 30, HasCompletion: true},
			reserve, ledger.Tokens{Prompt: prompt, Completion: 30}, false},
		{"embeddings: prompt and total", proxy.AnswerUsage{PromptTokens: 90, TotalTokens: 90, HasPrompt: true, HasTotal: true},
			prompt, ledger.Tokens{Prompt: 90}, false},
		{"embeddings: the prompt alone", proxy.AnswerUsage{PromptTokens: 90, HasPrompt: true},
			prompt, ledger.Tokens{Prompt: 90}, false},
		{"a stream's usage before its output", proxy.AnswerUsage{Stream: true, PromptTokens: 5, HasPrompt: true, HasCompletion: true, Chunks: 40},
			reserve, ledger.Tokens{Prompt: 5, Completion: 40}, false},
		{"a stream's usage before its last output", proxy.AnswerUsage{Stream: true, PromptTokens: 5, CompletionTokens: 30, HasPrompt: true, HasCompletion: true, Chunks: 40, ChunksAtUsage: 30},
			reserve, ledger.Tokens{Prompt: 5, Completion: 40}, false},
		{"a stream's usage after its output", proxy.AnswerUsage{Stream: true, PromptTokens: 5, CompletionTokens: 37, HasPrompt: true, HasCompletion: true, Chunks: 40, ChunksAtUsage: 40},
			reserve, ledger.Tokens{Prompt: 5, Completion: 37}, false},
	})
}

// TestChargePastCap: output reported past the cap the request was sent is
// charged only as far as the answer carried it, its deltas counted for a
// stream, its bytes for a whole answer; the rest is pastCap.
func TestChargePastCap(t *testing.T) {
	const reserve, prompt = 110, 10 // a cap of 100
	for _, tc := range []struct {
		name    string
		usage   proxy.AnswerUsage
		want    ledger.Tokens
		pastCap int64
	}{
		{"within the cap", proxy.AnswerUsage{PromptTokens: 5000, CompletionTokens: 100, Bytes: 900},
			ledger.Tokens{Prompt: 5000, Completion: 100}, 0},
		{"a whole answer past its cap and its bytes", proxy.AnswerUsage{PromptTokens: 10, CompletionTokens: 100_000, ReasoningTokens: 90_000, Bytes: 900},
			ledger.Tokens{Prompt: 10, Completion: 900, Reasoning: 900}, 99_100},
		{"a whole answer that carried it", proxy.AnswerUsage{PromptTokens: 10, CompletionTokens: 2000, Bytes: 9000},
			ledger.Tokens{Prompt: 10, Completion: 2000}, 0},
		{"a stream past its cap and its deltas", proxy.AnswerUsage{Stream: true, PromptTokens: 10, CompletionTokens: 100_000, Chunks: 100},
			ledger.Tokens{Prompt: 10, Completion: 100}, 99_900},
		{"a stream that carried it", proxy.AnswerUsage{Stream: true, PromptTokens: 10, CompletionTokens: 3000, Chunks: 3000},
			ledger.Tokens{Prompt: 10, Completion: 3000}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := tc.usage
			u.Status, u.Reported, u.Prompt, u.HasPrompt, u.HasCompletion = 200, true, prompt, true, true
			u.ChunksAtUsage = u.Chunks
			used, absurd, pastCap := Charge(&u, reserve, 40)
			if used != tc.want || absurd || pastCap != tc.pastCap {
				t.Errorf("charged %+v (absurd %v, past the cap %d), want %+v (past the cap %d)", used, absurd, pastCap, tc.want, tc.pastCap)
			}
		})
	}
}

// TestAbsurdUsageIsLogged: the operator learns of usage the proxy did not
// believe, with the caller's key ID and the upstream's figures.
func TestAbsurdUsageIsLogged(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	h := &Admitter{Logger: zap.New(core), Policy: new(policy.Policy)}
	garbled := `{"prompt_tokens":-7,"completion_tokens":5}`
	for _, u := range []proxy.AnswerUsage{
		{Status: 200, Reported: true, PromptTokens: 7, CompletionTokens: 5, HasPrompt: true, HasCompletion: true},
		{Status: 200, Reported: true, CompletionTokens: 5, Garbled: garbled},
		{Status: 200, Reported: true, PromptTokens: maxAnswerTokens + 1},
	} {
		h.ChargeFor("key_x", "vigthoria-fast-1", &u, 4100, 400)
	}
	entries := logs.All()
	if len(entries) != 2 {
		t.Fatalf("%d warnings, want 2: %v", len(entries), entries)
	}
	for _, e := range entries {
		if f := e.ContextMap(); f["client_id"] != "key_x" || f["model"] != "vigthoria-fast-1" || f["reserved"] != int64(4100) {
			t.Errorf("warning %q with %v, want the client, model and reservation", e.Message, f)
		}
	}
	if f := entries[0].ContextMap(); f["garbled_usage"] != garbled {
		t.Errorf("garbled usage logged as %v, want %s", f["garbled_usage"], garbled)
	}
	if f := entries[1].ContextMap(); f["prompt_tokens"] != int64(maxAnswerTokens+1) {
		t.Errorf("prompt tokens logged as %v, want %d", f["prompt_tokens"], maxAnswerTokens+1)
	}
}

// TestChargeForCosts: what a request is charged carries its cost at its
// model's price, the reservation's when the usage was not believed, and
// nothing for a model without a price.
func TestChargeForCosts(t *testing.T) {
	h := &Admitter{Logger: zap.NewNop()}
	var err error
	h.Policy, err = policy.New(policy.Config{Currency: policy.DefaultCurrency, Unpriced: policy.UnpricedRefuse,
		Prices: []*policy.Price{{Model: "vigthoria-fast-*", Input: "0.10", Output: "0.40"}}})
	if err != nil {
		t.Fatal(err)
	}
	reported := proxy.AnswerUsage{Status: 200, Reported: true, PromptTokens: 1200, CompletionTokens: 345, HasPrompt: true, HasCompletion: true}
	for _, tc := range []struct {
		name  string
		model string
		u     proxy.AnswerUsage
		want  ledger.Tokens
	}{
		{"priced", "vigthoria-fast-1", reported, ledger.Tokens{Prompt: 1200, Completion: 345, Cost: 258}}, // 120 + 138
		{"unpriced", "other", reported, ledger.Tokens{Prompt: 1200, Completion: 345}},
		{"absurd: the reservation", "vigthoria-fast-1", proxy.AnswerUsage{Status: 200, Reported: true, Garbled: "x"},
			ledger.Tokens{Prompt: 100, Completion: 4000, Cost: 1610}}, // 10 + 1600
	} {
		if got, _ := h.ChargeFor("key_x", tc.model, &tc.u, 4100, 400); got != tc.want {
			t.Errorf("%s: charged %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
