package policy

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// TestPoliceReservesEveryChoice: the cap holds per choice, the reservation
// counts them all.
func TestPoliceReservesEveryChoice(t *testing.T) {
	h := new(Policy)
	tier := &Tier{MaxTokens: 256, Models: []string{"vigthoria-fast-*"}}
	prompts := `["p",` + strings.Repeat(`"p",`, 98) + `"p"]`
	for _, tc := range []struct {
		name, body string
		ep         int
		choices    int64
		code       string
	}{
		{"100 prompts", `{"model":"vigthoria-fast-1","max_tokens":256,"prompt":` + prompts + `}`, api.Completions, 100, ""},
		{"best_of", `{"model":"vigthoria-fast-1","max_tokens":256,"prompt":"p","n":2,"best_of":8}`, api.Completions, 8, ""},
		{"n for chat", `{"model":"vigthoria-fast-1","max_tokens":256,"n":4,"messages":[]}`, api.ChatCompletions, 4, ""},
		{"no max_tokens: the cap for each", `{"model":"vigthoria-fast-1","prompt":["a","b","c"]}`, api.Completions, 3, ""},
		{"the cap is per choice", `{"model":"vigthoria-fast-1","max_tokens":257,"prompt":"p"}`, api.Completions, 0, "max_tokens_too_large"},
		{"folded model", `{"model":"vigthoria-fast-1","Model":"vigthoria-pro-1","messages":[]}`, api.ChatCompletions, 0, "invalid_request"},
		{"folded n", `{"model":"vigthoria-fast-1","max_tokens":256,"N":64,"messages":[]}`, api.ChatCompletions, 0, "invalid_request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/v1/completions", strings.NewReader(tc.body))
			call := new(proxy.Call)
			info, reserve, apiErr := h.Police(r, &api.Endpoints[tc.ep], tier, []byte(tc.body), call)
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
	bucket := &Tier{Tokens: &TierRate{N: 2000, Window: caddy.Duration(time.Minute)}}
	capped := &Tier{MaxTokens: 50}
	smallQuota := &Tier{Quota: &Quota{N: 2000, Period: "day"}}
	smallBudget := &Tier{Budget: &Budget{Amount: "0.001", Period: "day"}} // 1000 micro-units
	priced := pricedPolicy(t, `{"prices": [{"model": "m", "input": "10", "output": "20"}]}`)
	for _, tier := range []*Tier{bucket, capped, smallQuota, smallBudget, {}} {
		if err := tier.provision("t"); err != nil {
			t.Fatal(err)
		}
	}
	chat, completions, embeddings := &api.Endpoints[api.ChatCompletions], &api.Endpoints[api.Completions], &api.Endpoints[api.Embeddings]
	long := strings.Repeat("word ", 2000)
	for _, tc := range []struct {
		name     string
		h        *Policy
		ep       *api.Endpoint
		tier     *Tier
		body     string
		field    string // the cap field the upstream gets; "" for the body unchanged
		cap      int64  // its value; -1: (2000 - prompt) / choices
		code, in string // a refusal's code, and what its message says
	}{
		{"chat: the default", new(Policy), chat, &Tier{}, `{"model":"m","messages":[]}`, "max_completion_tokens", DefaultMaxTokens, "", ""},
		{"chat: the configured default", &Policy{cfg: Config{DefaultMaxTokens: 100}}, chat, &Tier{}, `{"model":"m","messages":[]}`, "max_completion_tokens", 100, "", ""},
		{"chat: cap_field max_tokens", &Policy{cfg: Config{CapField: "max_tokens"}}, chat, &Tier{}, `{"model":"m","messages":[]}`, "max_tokens", DefaultMaxTokens, "", ""},
		{"chat: the field it names as null", new(Policy), chat, &Tier{}, `{"model":"m","max_tokens":null,"messages":[]}`, "max_tokens", DefaultMaxTokens, "", ""},
		{"chat: the tier's cap", new(Policy), chat, capped, `{"model":"m","messages":[]}`, "max_completion_tokens", 50, "", ""},
		{"chat: its own cap is kept", new(Policy), chat, capped, `{"model":"m","max_tokens":7,"messages":[]}`, "", 0, "", ""},
		{"chat: shrunk to the bucket", new(Policy), chat, bucket, `{"model":"m","messages":[]}`, "max_completion_tokens", -1, "", ""},
		{"chat: shrunk for each of n", new(Policy), chat, bucket, `{"model":"m","n":3,"messages":[]}`, "max_completion_tokens", -1, "", ""},
		{"completions: max_tokens", new(Policy), completions, &Tier{}, `{"model":"m","prompt":"p"}`, "max_tokens", DefaultMaxTokens, "", ""},
		{"completions: shrunk for each prompt and best_of", new(Policy), completions, bucket, `{"model":"m","prompt":["a","b"],"best_of":2}`, "max_tokens", -1, "", ""},
		{"completions: a cap in the field they do not read", new(Policy), completions, &Tier{}, `{"model":"m","prompt":"p","max_completion_tokens":9}`, "max_tokens", 9, "", ""},
		{"its own cap over the bucket", new(Policy), chat, bucket, `{"model":"m","max_completion_tokens":5000,"messages":[]}`, "", 0, "request_too_large", "max_completion_tokens 5000"},
		{"its own cap over the bucket, for each of n", new(Policy), chat, bucket, `{"model":"m","n":2,"max_tokens":1000,"messages":[]}`, "", 0, "request_too_large", "for each of this request's 2 answers"},
		{"a prompt over the bucket", new(Policy), chat, bucket, `{"model":"m","messages":[{"content":"` + long + `"}]}`, "", 0, "request_too_large", "shorten the prompt"},
		{"an input over the bucket", new(Policy), embeddings, bucket, `{"model":"m","input":"` + long + `"}`, "", 0, "request_too_large", "is more than your tier's token limit (2000 tokens per 1m0s)"},
		{"over the tier's cap", new(Policy), chat, capped, `{"model":"m","max_tokens":51,"messages":[]}`, "", 0, "max_tokens_too_large", ""},
		{"shrunk to a small quota", new(Policy), chat, smallQuota, `{"model":"m","messages":[]}`, "max_completion_tokens", -1, "", ""},
		{"shrunk to what a small budget pays for", priced, chat, smallBudget, `{"model":"m","messages":[]}`, "max_completion_tokens", -2, "", ""},
		{"its own cap is the limiter's to judge against a quota", new(Policy), chat, smallQuota, `{"model":"m","max_tokens":5000,"messages":[]}`, "", 0, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/v1/x", strings.NewReader(tc.body))
			call := new(proxy.Call)
			info, reserve, apiErr := tc.h.Police(r, tc.ep, tc.tier, []byte(tc.body), call)
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

// BenchmarkPolice polices a typical small chat, as every request is;
// one without a cap, as the SDKs send by default, gets one.
func BenchmarkPolice(b *testing.B) {
	const chat = `{"model":"vigthoria-fast-1","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence, please."}],%s"temperature":0.7,"stream":false}`
	for _, bc := range []struct{ name, cap string }{{"capped", `"max_tokens":64,`}, {"uncapped", ""}} {
		b.Run(bc.name, func(b *testing.B) {
			h := new(Policy)
			tier := &Tier{Models: []string{"vigthoria-fast-*"}}
			body := []byte(fmt.Sprintf(chat, bc.cap))
			r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", nil)
			ep := &api.Endpoints[api.ChatCompletions]
			b.ReportAllocs()
			for b.Loop() {
				var call proxy.Call
				if _, _, err := h.Police(r, ep, tier, body, &call); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestModelRefusalNamesWhatRefuses: a model refused to the user of a
// minted token is refused by name of what refuses it: the token's own
// models, its tier's, or those of the key that minted it.
func TestModelRefusalNamesWhatRefuses(t *testing.T) {
	h := tierPolicy(t, map[string]*Tier{"web": {Models: []string{"vigthoria-*"}}, "app": {Models: []string{"vigthoria-fast-*"}}})
	web, app := h.cfg.Tiers["web"], h.cfg.Tiers["app"]
	own := []string{"vigthoria-fast-1"}
	token := h.Narrow(web, app, own, proxy.FilterKey(own))
	user := h.Narrow(web, app, nil, "")
	for _, tc := range []struct {
		name  string
		tier  *Tier
		model string
		want  string
	}{
		{"the tier's list", web, "other-1", "your tier"},
		{"the token's own list", token, "vigthoria-fast-2", "your token"},
		{"the minting key's list", user, "vigthoria-pro-1", "the app that signed you in"},
		{"the tier's, under a token that allows it", user, "other-1", "your tier"},
	} {
		body := `{"model":"` + tc.model + `","messages":[]}`
		r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
		_, _, apiErr := h.Police(r, &api.Endpoints[api.ChatCompletions], tc.tier, []byte(body), new(proxy.Call))
		if apiErr == nil || apiErr.Code != "model_not_allowed" || !strings.HasSuffix(apiErr.Message, "is not available to "+tc.want+".") {
			t.Errorf("%s: %v, want model_not_allowed naming %q", tc.name, apiErr, tc.want)
		}
	}
}
