package vigthoria

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// TestPoliceReservesEveryChoice: the cap holds per choice, the reservation
// counts them all.
func TestPoliceReservesEveryChoice(t *testing.T) {
	h := new(Handler)
	tier := &Tier{MaxTokens: 256, Models: []string{"vigthoria-fast-*"}}
	prompts := `["p",` + strings.Repeat(`"p",`, 98) + `"p"]`
	for _, tc := range []struct {
		name, body string
		ep         int
		choices    int64
		code       string
	}{
		{"100 prompts", `{"model":"vigthoria-fast-1","max_tokens":256,"prompt":` + prompts + `}`, proxy.Completions, 100, ""},
		{"best_of", `{"model":"vigthoria-fast-1","max_tokens":256,"prompt":"p","n":2,"best_of":8}`, proxy.Completions, 8, ""},
		{"n for chat", `{"model":"vigthoria-fast-1","max_tokens":256,"n":4,"messages":[]}`, proxy.ChatCompletions, 4, ""},
		{"no max_tokens: the cap for each", `{"model":"vigthoria-fast-1","prompt":["a","b","c"]}`, proxy.Completions, 3, ""},
		{"the cap is per choice", `{"model":"vigthoria-fast-1","max_tokens":257,"prompt":"p"}`, proxy.Completions, 0, "max_tokens_too_large"},
		{"folded model", `{"model":"vigthoria-fast-1","Model":"vigthoria-pro-1","messages":[]}`, proxy.ChatCompletions, 0, "invalid_request"},
		{"folded n", `{"model":"vigthoria-fast-1","max_tokens":256,"N":64,"messages":[]}`, proxy.ChatCompletions, 0, "invalid_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/v1/completions", strings.NewReader(tc.body))
			call := new(proxy.Call)
			info, reserve, apiErr := h.police(r, &proxy.Endpoints[tc.ep], tier, []byte(tc.body), call)
			if tc.code != "" {
				if apiErr == nil || apiErr.Code != tc.code {
					t.Fatalf("got %v, want %s", apiErr, tc.code)
				}
				return
			}
			if apiErr != nil {
				t.Fatal(apiErr.Message)
			}
			if want := info.PromptTokens + tc.choices*256; reserve != want || info.Choices != tc.choices {
				t.Errorf("reserved %d for %d choices, want %d for %d", reserve, info.Choices, want, tc.choices)
			}
		})
	}
}

// TestPoliceCaps: every request that generates leaves with a cap in a
// field its endpoint reads, the smallest that applies, shrunk to what
// the token bucket holds beside its prompt; a cap or a prompt that
// cannot fit is refused with a message that says which.
func TestPoliceCaps(t *testing.T) {
	bucket := &Tier{Tokens: &Rate{N: 2000, Window: caddy.Duration(time.Minute)}}
	capped := &Tier{MaxTokens: 50}
	smallQuota := &Tier{Quota: &Quota{N: 2000, Period: "day"}}
	smallBudget := &Tier{Budget: &Budget{Amount: "0.001", Period: "day"}} // 1000 micro-units
	priced := pricedHandler(t, `{"prices": [{"model": "m", "input": "10", "output": "20"}]}`)
	for _, tier := range []*Tier{bucket, capped, smallQuota, smallBudget, {}} {
		if err := tier.provision("t"); err != nil {
			t.Fatal(err)
		}
	}
	chat, completions, embeddings := &proxy.Endpoints[proxy.ChatCompletions], &proxy.Endpoints[proxy.Completions], &proxy.Endpoints[proxy.Embeddings]
	long := strings.Repeat("word ", 2000)
	for _, tc := range []struct {
		name     string
		h        *Handler
		ep       *proxy.Endpoint
		tier     *Tier
		body     string
		field    string // the cap field the upstream gets; "" for the body unchanged
		cap      int64  // its value; -1: (2000 - prompt) / choices
		code, in string // a refusal's code, and what its message says
	}{
		{"chat: the default", new(Handler), chat, &Tier{}, `{"model":"m","messages":[]}`, "max_completion_tokens", DefaultMaxTokens, "", ""},
		{"chat: the configured default", &Handler{DefaultMaxTokens: 100}, chat, &Tier{}, `{"model":"m","messages":[]}`, "max_completion_tokens", 100, "", ""},
		{"chat: cap_field max_tokens", &Handler{CapField: "max_tokens"}, chat, &Tier{}, `{"model":"m","messages":[]}`, "max_tokens", DefaultMaxTokens, "", ""},
		{"chat: the field it names as null", new(Handler), chat, &Tier{}, `{"model":"m","max_tokens":null,"messages":[]}`, "max_tokens", DefaultMaxTokens, "", ""},
		{"chat: the tier's cap", new(Handler), chat, capped, `{"model":"m","messages":[]}`, "max_completion_tokens", 50, "", ""},
		{"chat: its own cap is kept", new(Handler), chat, capped, `{"model":"m","max_tokens":7,"messages":[]}`, "", 0, "", ""},
		{"chat: shrunk to the bucket", new(Handler), chat, bucket, `{"model":"m","messages":[]}`, "max_completion_tokens", -1, "", ""},
		{"chat: shrunk for each of n", new(Handler), chat, bucket, `{"model":"m","n":3,"messages":[]}`, "max_completion_tokens", -1, "", ""},
		{"completions: max_tokens", new(Handler), completions, &Tier{}, `{"model":"m","prompt":"p"}`, "max_tokens", DefaultMaxTokens, "", ""},
		{"completions: shrunk for each prompt and best_of", new(Handler), completions, bucket, `{"model":"m","prompt":["a","b"],"best_of":2}`, "max_tokens", -1, "", ""},
		{"completions: a cap in the field they do not read", new(Handler), completions, &Tier{}, `{"model":"m","prompt":"p","max_completion_tokens":9}`, "max_tokens", 9, "", ""},
		{"its own cap over the bucket", new(Handler), chat, bucket, `{"model":"m","max_completion_tokens":5000,"messages":[]}`, "", 0, "request_too_large", "max_completion_tokens 5000"},
		{"its own cap over the bucket, for each of n", new(Handler), chat, bucket, `{"model":"m","n":2,"max_tokens":1000,"messages":[]}`, "", 0, "request_too_large", "for each of this request's 2 answers"},
		{"a prompt over the bucket", new(Handler), chat, bucket, `{"model":"m","messages":[{"content":"` + long + `"}]}`, "", 0, "request_too_large", "shorten the prompt"},
		{"an input over the bucket", new(Handler), embeddings, bucket, `{"model":"m","input":"` + long + `"}`, "", 0, "request_too_large", "is more than your tier's token limit (2000 tokens per 1m0s)"},
		{"over the tier's cap", new(Handler), chat, capped, `{"model":"m","max_tokens":51,"messages":[]}`, "", 0, "max_tokens_too_large", ""},
		{"shrunk to a small quota", new(Handler), chat, smallQuota, `{"model":"m","messages":[]}`, "max_completion_tokens", -1, "", ""},
		{"shrunk to what a small budget pays for", priced, chat, smallBudget, `{"model":"m","messages":[]}`, "max_completion_tokens", -2, "", ""},
		{"its own cap is the limiter's to judge against a quota", new(Handler), chat, smallQuota, `{"model":"m","max_tokens":5000,"messages":[]}`, "", 0, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/v1/x", strings.NewReader(tc.body))
			call := new(proxy.Call)
			info, reserve, apiErr := tc.h.police(r, tc.ep, tc.tier, []byte(tc.body), call)
			if tc.code != "" {
				if apiErr == nil || apiErr.Code != tc.code || !strings.Contains(apiErr.Message, tc.in) {
					t.Fatalf("got %v, want %s saying %q", apiErr, tc.code, tc.in)
				}
				if strings.Contains(tc.in, "prompt") && strings.Contains(apiErr.Message, "max_") {
					t.Errorf("a prompt too large is told about a cap: %s", apiErr.Message)
				}
				return
			}
			if apiErr != nil {
				t.Fatal(apiErr.Message)
			}
			if tc.field == "" {
				if string(call.Body) != tc.body {
					t.Errorf("the body became %s, want it unchanged", call.Body)
				}
				return
			}
			var sent map[string]any
			if err := json.Unmarshal(call.Body, &sent); err != nil {
				t.Fatal(err)
			}
			choices := max(info.Choices, 1)
			want := tc.cap
			switch want {
			case -1:
				want = (2000 - info.PromptTokens) / choices
			case -2: // 10 a prompt token, 20 an answer's, of 1000
				want = (1000 - 10*info.PromptTokens) / 20
			}
			if got, _ := sent[tc.field].(float64); int64(got) != want {
				t.Errorf("the upstream gets %s %v (body %s), want %d", tc.field, sent[tc.field], call.Body, want)
			}
			if reserve != info.PromptTokens+choices*want {
				t.Errorf("reserved %d, want the prompt %d and %d answers of %d", reserve, info.PromptTokens, choices, want)
			}
			if tc.tier == bucket && reserve > 2000 {
				t.Errorf("reserved %d, more than the bucket holds", reserve)
			}
		})
	}
}

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
				u.Reported, u.PromptTokens, u.CompletionTokens = true, 12, 34
			}
			u.Watch(context.Background())
			if tc.gone {
				u.Watch(left)
			}
			if tc.sent {
				u.MarkSent(true)
			}
			used, absurd, _ := charge(u, reserve, 400)
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
	for _, tc := range []struct {
		name    string
		usage   proxy.AnswerUsage
		reserve int64
		want    ledger.Tokens
		absurd  bool
	}{
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
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := tc.usage
			u.Status, u.Reported, u.Prompt = 200, true, prompt
			if used, absurd, _ := charge(&u, tc.reserve, 400); used != tc.want || absurd != tc.absurd {
				t.Errorf("charged %+v (absurd %v), want %+v (absurd %v)", used, absurd, tc.want, tc.absurd)
			}
		})
	}
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
			u.Status, u.Reported, u.Prompt = 200, true, prompt
			used, absurd, pastCap := charge(&u, reserve, 40)
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
	h := &Handler{logger: zap.New(core)}
	garbled := `{"prompt_tokens":-7,"completion_tokens":5}`
	for _, u := range []proxy.AnswerUsage{
		{Status: 200, Reported: true, PromptTokens: 7, CompletionTokens: 5},
		{Status: 200, Reported: true, CompletionTokens: 5, Garbled: garbled},
		{Status: 200, Reported: true, PromptTokens: maxAnswerTokens + 1},
	} {
		h.chargeFor("key_x", "pro", "vigthoria-fast-1", &u, 4100, 400)
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

// BenchmarkPolice polices a typical small chat, as every request is;
// one without a cap, as the SDKs send by default, gets one.
func BenchmarkPolice(b *testing.B) {
	const chat = `{"model":"vigthoria-fast-1","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence, please."}],%s"temperature":0.7,"stream":false}`
	for _, bc := range []struct{ name, cap string }{{"capped", `"max_tokens":64,`}, {"uncapped", ""}} {
		b.Run(bc.name, func(b *testing.B) {
			h := new(Handler)
			tier := &Tier{Models: []string{"vigthoria-fast-*"}}
			body := []byte(fmt.Sprintf(chat, bc.cap))
			r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil)
			ep := &proxy.Endpoints[proxy.ChatCompletions]
			b.ReportAllocs()
			for b.Loop() {
				var call proxy.Call
				if _, _, err := h.police(r, ep, tier, body, &call); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
