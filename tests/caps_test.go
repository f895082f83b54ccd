package tests

import (
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// uncapped is what the stand-in writes for each answer of a request that
// sets no cap: a model's own output limit.
const uncapped = 16_000

// capTiers are tiers with a budget, a quota and a token bucket, none
// with max_tokens: a request without one gets the default cap.
var capTiers = []string{
	"tier spend {\n\t\t\tbudget 1/day\n\t\t}",
	"tier quota {\n\t\t\tquota 5000/day\n\t\t}",
	"tier bucket {\n\t\t\ttokens 2000/1m\n\t\t}",
}

// chatAtOnce sends n chats at once with key to base, without a cap, as
// an SDK does by default, and returns how many were answered. Every
// refusal must be a 429. Each chat has a connection of its own, closed
// after it: a burst on shared ones dials connections it never uses,
// which hold up Caddy's shutdown.
func chatAtOnce(t *testing.T, base, key string, n int) int64 {
	client := openai.NewClient(option.WithBaseURL(base+"/v1/"), option.WithAPIKey(key), option.WithMaxRetries(0),
		option.WithHTTPClient(&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}))
	var ok atomic.Int64
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			_, err := client.Chat.Completions.New(t.Context(), chatParams("write as much as you can"))
			if err == nil {
				ok.Add(1)
				return
			}
			var oe *openai.Error
			if !errors.As(err, &oe) || oe.StatusCode != http.StatusTooManyRequests {
				t.Errorf("a chat: %v", err)
			}
		})
	}
	wg.Wait()
	return ok.Load()
}

// wantEveryAnswerCapped asserts that the upstream gave each completion
// it answered a cap, and wrote no more than it.
func wantEveryAnswerCapped(t *testing.T, up *standin.Server) []standin.Cap {
	t.Helper()
	caps := up.Caps()
	for i, c := range caps {
		if c.Field == "" || c.Tokens > c.N {
			t.Errorf("completion %d of %d: the upstream got cap %q %d and wrote %d tokens an answer, want a cap", i+1, len(caps), c.Field, c.N, c.Tokens)
		}
	}
	return caps
}

// TestUncappedRequestsCarryTheirCap: requests without max_tokens, the
// default of every SDK, reach an upstream that would write 16,000 tokens
// each with the cap their reservation assumed: 40 chats at once spend no
// more than a budget or a quota, and a tier whose token bucket is smaller
// than the default cap serves them, the cap shrunk to fit.
func TestUncappedRequestsCarryTheirCap(t *testing.T) {
	e := start(t, append([]string{builtinDefaultCap, manyFailures, testPrices}, capTiers...)...)
	spendID, spendKey := e.addKey(t, "spend")
	quotaID, quotaKey := e.addKey(t, "quota")
	_, bucketKey := e.addKey(t, "bucket")
	e.waitKeysKnown(t)
	e.upstream.Reset()
	e.upstream.SetBehavior(standin.Behavior{Uncapped: uncapped})

	t.Run("budget", func(t *testing.T) {
		answered := chatAtOnce(t, e.caddy.URL, spendKey, 40)
		var cost int64
		eventually2s(t, "the ledger holds every answered chat", func() bool {
			row := e.storedToday(t, spendID)
			cost = row.Cost
			return row.Requests == answered
		})
		t.Logf("40 chats at once without max_tokens on budget 1/day: %d answered, %d micro-units spent (%.2f of the budget)",
			answered, cost, float64(cost)/1e6)
		if answered == 0 || cost > 1_000_000 {
			t.Errorf("%d chats spent %d micro-units, want some answered and at most the budget 1000000", answered, cost)
		}
	})

	t.Run("quota", func(t *testing.T) {
		answered := chatAtOnce(t, e.caddy.URL, quotaKey, 40)
		var used int64
		eventually2s(t, "the ledger holds every answered chat", func() bool {
			row := e.storedToday(t, quotaID)
			used = row.PromptTokens + row.CompletionTokens
			return row.Requests == answered
		})
		t.Logf("40 chats at once without max_tokens on quota 5000/day: %d answered, %d tokens charged", answered, used)
		if answered == 0 || used > 5000 {
			t.Errorf("%d chats were charged %d tokens, want some answered and at most the quota 5000", answered, used)
		}
	})

	t.Run("token bucket", func(t *testing.T) {
		client := newClient(e.caddy.URL, bucketKey)
		res, err := client.Chat.Completions.New(t.Context(), chatParams("hi"))
		if err != nil {
			t.Fatalf("a chat without max_tokens on tokens 2000/1m: %v", err)
		}
		if got := res.Usage.TotalTokens; got > 2000 {
			t.Errorf("the chat used %d tokens, more than the bucket's 2000", got)
		}
	})

	caps := wantEveryAnswerCapped(t, e.upstream)
	if len(caps) == 0 {
		t.Fatal("the upstream answered no completion")
	}
	for _, c := range caps[:len(caps)-1] {
		if c.N != 4096 {
			t.Errorf("a chat of the budget or quota tier got cap %d, want the default 4096", c.N)
		}
	}
	if c := caps[len(caps)-1]; c.N >= 2000 {
		t.Errorf("the token bucket's chat got cap %d, want what fits 2000 with its prompt", c.N)
	}
}

// TestSmallQuotaAndBudgetServeUncapped: a request without a cap on a
// tier whose quota, or budget at the model's price, is smaller than the
// default cap is served, its cap shrunk to what they could pay for.
func TestSmallQuotaAndBudgetServeUncapped(t *testing.T) {
	e := start(t, builtinDefaultCap, manyFailures, testPrices,
		"tier small {\n\t\t\tquota 3000/day\n\t\t}", "tier cheap {\n\t\t\tbudget 0.01/day\n\t\t}")
	_, small := e.addKey(t, "small")
	_, cheap := e.addKey(t, "cheap")
	e.waitKeysKnown(t)
	e.upstream.Reset()
	e.upstream.SetBehavior(standin.Behavior{Uncapped: uncapped})
	for _, key := range []string{small, cheap} {
		client := newClient(e.caddy.URL, key)
		if _, err := client.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
			t.Errorf("a chat without a cap: %v", err)
		}
	}
	caps := wantEveryAnswerCapped(t, e.upstream)
	if len(caps) != 2 || caps[0].N >= 3000 || caps[1].N*20 >= 10_000 {
		t.Errorf("caps %+v, want below the quota's 3000 tokens and what 0.01 buys at 20 micro-units a token", caps)
	}
}

// TestTooLargeSaysWhy: on a tier whose token bucket holds 2000 tokens,
// a request without a cap is served on every endpoint that generates,
// every choice counted; one whose own max_tokens does not fit is told
// so, with what would; one whose prompt alone does not fit is told that.
func TestTooLargeSaysWhy(t *testing.T) {
	e := start(t, append([]string{builtinDefaultCap, manyFailures}, capTiers...)...)
	// A key for each request served: each fills the bucket.
	keys := make([]string, 5)
	for i := range keys {
		_, keys[i] = e.addKey(t, "bucket")
	}
	e.waitKeysKnown(t)
	e.upstream.Reset()
	e.upstream.SetBehavior(standin.Behavior{Uncapped: uncapped})
	served := 0
	post := func(path, body string) *http.Response {
		auth := http.Header{"Authorization": {"Bearer " + keys[served]}, "Content-Type": {"application/json"}}
		res := e.do(t, http.MethodPost, path, strings.NewReader(body), auth)
		if res.StatusCode == http.StatusOK {
			served++
		}
		return res
	}

	for _, body := range []struct{ path, body string }{
		{"/v1/completions", `{"model":"vigthoria-fast-1","prompt":["a","b"],"n":2}`},
		{"/v1/completions", `{"model":"vigthoria-fast-1","prompt":"a","best_of":3}`},
		{"/v1/chat/completions", `{"model":"vigthoria-fast-1","stream":true,"messages":[{"role":"user","content":"hi"}]}`},
		{"/v1/chat/completions", `{"model":"vigthoria-fast-1","n":3,"max_tokens":null,"messages":[{"role":"user","content":"hi"}]}`},
	} {
		res := post(body.path, body.body)
		var u struct{ Usage struct{ TotalTokens int64 } }
		if res.StatusCode != http.StatusOK {
			t.Errorf("%s %s: %d, want 200", body.path, body.body, res.StatusCode)
			continue
		}
		if !strings.Contains(body.body, `"stream"`) {
			json.NewDecoder(res.Body).Decode(&u)
			if u.Usage.TotalTokens > 2000 {
				t.Errorf("%s used %d tokens, more than the bucket's 2000", body.body, u.Usage.TotalTokens)
			}
		}
	}
	caps := wantEveryAnswerCapped(t, e.upstream)
	if len(caps) != 4 {
		t.Errorf("the upstream answered %d completions, want 4", len(caps))
	}

	res := post("/v1/chat/completions", `{"model":"vigthoria-fast-1","max_tokens":5000,"messages":[{"role":"user","content":"hi"}]}`)
	msg := wantAPIError(t, res, http.StatusTooManyRequests, "request_too_large").Error.Message
	if !strings.Contains(msg, "max_tokens 5000") || !strings.Contains(msg, "at most 19") || res.Header.Get("X-Should-Retry") != "false" {
		t.Errorf("a max_tokens too large for the bucket: %q (x-should-retry %q), want it named, with the largest that fits, not to be retried",
			msg, res.Header.Get("X-Should-Retry"))
	}
	long := strings.Repeat("word ", 2000)
	for _, body := range []string{
		`{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"` + long + `"}]}`,
		`{"model":"vigthoria-fast-1","max_tokens":10,"messages":[{"role":"user","content":"` + long + `"}]}`,
	} {
		res := post("/v1/chat/completions", body)
		msg := wantAPIError(t, res, http.StatusTooManyRequests, "request_too_large").Error.Message
		if !strings.Contains(msg, "prompt") || strings.Contains(msg, "max_tokens") {
			t.Errorf("a prompt too large for the bucket: %q, want it to say the prompt, not max_tokens", msg)
		}
	}
	e.wantUpstreamCalls(t, 4)
}

// TestCapFieldAndDefault: a chat without a cap gets max_completion_tokens,
// which reasoning models require (they refuse max_tokens); cap_field
// max_tokens serves upstreams that read only that; default_max_tokens
// sets the default cap; /v1/completions always gets max_tokens, and so
// does a chat with cap_field max_tokens whose cap is in
// max_completion_tokens; the caller's own field is kept.
func TestCapFieldAndDefault(t *testing.T) {
	e := start(t, builtinDefaultCap, manyFailures)
	e.upstream.Reset()
	e.upstream.SetBehavior(standin.Behavior{Uncapped: uncapped, RejectMaxTokens: true})
	if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("think hard")); err != nil {
		t.Fatalf("a chat without a cap to a model that refuses max_tokens: %v", err)
	}
	res := e.do(t, http.MethodPost, "/v1/completions", strings.NewReader(`{"model":"vigthoria-fast-1","prompt":"a"}`),
		http.Header{"Content-Type": {"application/json"}})
	if res.StatusCode != http.StatusOK {
		t.Errorf("a completion without a cap: %d", res.StatusCode)
	}
	params := chatParams("mine")
	params.MaxTokens = openai.Int(7)
	e.upstream.SetBehavior(standin.Behavior{Uncapped: uncapped})
	if _, err := e.client.Chat.Completions.New(t.Context(), params); err != nil {
		t.Fatal(err)
	}
	want := []standin.Cap{{Field: "max_completion_tokens", N: 4096, Tokens: 4096}, {Field: "max_tokens", N: 4096, Tokens: 4096},
		{Field: "max_tokens", N: 7, Tokens: 7}}
	if got := e.upstream.Caps(); !equalCaps(got, want) {
		t.Errorf("caps %+v, want %+v", got, want)
	}

	e.reload(t, manyFailures, "cap_field max_tokens", "default_max_tokens 100")
	e.upstream.Reset()
	e.upstream.SetBehavior(standin.Behavior{Uncapped: uncapped, IgnoreMaxCompletionTokens: true})
	client := newClient(e.caddy.URL, e.key)
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
		t.Fatal(err)
	}
	// The SDKs' own field, max_completion_tokens, which such an upstream
	// ignores: its cap goes in max_tokens too, or the upstream would write
	// past what the request was checked and reserved for.
	own := chatParams("mine")
	own.MaxCompletionTokens = openai.Int(50)
	if _, err := client.Chat.Completions.New(t.Context(), own); err != nil {
		t.Fatal(err)
	}
	if got, want := e.upstream.Caps(), []standin.Cap{{Field: "max_tokens", N: 100, Tokens: 100}, {Field: "max_tokens", N: 50, Tokens: 50}}; !equalCaps(got, want) {
		t.Errorf("with cap_field max_tokens and default_max_tokens 100: caps %+v, want %+v", got, want)
	}
}

func equalCaps(a, b []standin.Cap) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestMintedUserGetsTheSmallestCap: the user of a token minted by a key
// whose own max_tokens is 30 (its tier has none) is forwarded with that
// cap when it sends none, and refused above it: the smallest cap that
// applies, its minting key's.
func TestMintedUserGetsTheSmallestCap(t *testing.T) {
	e := start(t, builtinDefaultCap, manyFailures, "tier app", "tier web {\n\t\t\tmax_tokens 500\n\t\t}")
	_, backend := e.addKey(t, "app", "--mint", "web", "--max-tokens", "30")
	user := e.mintWhenKnown(t, backend, map[string]any{"user": "alice", "tier": "web"})
	e.upstream.Reset()
	e.upstream.SetBehavior(standin.Behavior{Uncapped: uncapped})
	client := newClient(e.caddy.URL, user.Token)
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
		t.Fatal(err)
	}
	if got, want := e.upstream.Caps(), []standin.Cap{{Field: "max_completion_tokens", N: 30, Tokens: 30}}; !equalCaps(got, want) {
		t.Errorf("caps %+v, want %+v", got, want)
	}
	params := chatParams("hi")
	params.MaxTokens = openai.Int(31)
	_, err := client.Chat.Completions.New(t.Context(), params)
	wantOpenAIError(t, err, http.StatusBadRequest, "max_tokens_too_large")
}
