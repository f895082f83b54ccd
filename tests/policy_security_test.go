package tests

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3/option"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// TestPolicedFieldsUnderAnotherSpelling: a key that an upstream matching
// keys case-insensitively or with Unicode folding (as encoding/json, and
// so the stand-in, does) reads as a policed field is refused before the
// upstream sees it.
func TestPolicedFieldsUnderAnotherSpelling(t *testing.T) {
	e := startTier(t, "models vigthoria-fast-*", "max_tokens 256")
	key, client := e.meteredKey(t)
	e.upstream.Reset()
	auth := http.Header{"Authorization": {"Bearer " + key}}
	const messages = `"messages":[{"role":"user","content":"hi"}]`

	t.Run("Model through the official client", func(t *testing.T) {
		_, err := client.Chat.Completions.New(t.Context(), chatParams("hi"), option.WithJSONSet("Model", "vigthoria-pro-1"))
		oe := wantOpenAIError(t, err, http.StatusBadRequest, "invalid_request")
		if !strings.Contains(oe.Message, `"Model"`) {
			t.Errorf("message %q does not name the field", oe.Message)
		}
	})
	for _, tc := range []struct{ name, body string }{
		{"Model", `{"model":"vigthoria-fast-1","Model":"vigthoria-pro-1",` + messages + `}`},
		{"MAX_TOKENS", `{"model":"vigthoria-fast-1","MAX_TOKENS":3000,` + messages + `}`},
		{"max_tokenſ (U+017F)", `{"model":"vigthoria-fast-1","max_token` + "\u017f" + `":3000,` + messages + `}`},
		{"max_toKens (U+212A), escaped", `{"model":"vigthoria-fast-1","max_to\u212aens":3000,` + messages + `}`},
		{"N", `{"model":"vigthoria-fast-1","max_tokens":256,"N":64,` + messages + `}`},
		{"Max_Completion_Tokens", `{"model":"vigthoria-fast-1","Max_Completion_Tokens":3000,` + messages + `}`},
		{"INCLUDE_USAGE", `{"model":"vigthoria-fast-1","stream":true,"stream_options":{"include_usage":false,"INCLUDE_USAGE":true},` + messages + `}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(tc.body), auth)
			wantAPIError(t, res, http.StatusBadRequest, "invalid_request")
		})
	}
	t.Run("prompt array under another spelling", func(t *testing.T) {
		body := `{"model":"vigthoria-fast-1","max_tokens":256,"prompt":"a","PROMPT":["a","b","c","d"]}`
		res := e.do(t, http.MethodPost, "/v1/completions", strings.NewReader(body), auth)
		wantAPIError(t, res, http.StatusBadRequest, "invalid_request")
	})
	e.wantUpstreamCalls(t, 0)
	// The policed names elsewhere than at the top level are not the
	// request's: they pass.
	body := `{"model":"vigthoria-fast-1","max_tokens":5,"messages":[{"role":"user","content":"hi","Model":"x","N":9}],"metadata":{"MAX_TOKENS":"x"}}`
	if res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(body), auth); res.StatusCode != http.StatusOK {
		t.Errorf("a body with those names in its messages got %d, want 200", res.StatusCode)
	}
}

// TestWorkMultipliersAreReserved: a completion's prompts, n and best_of
// multiply what the upstream generates; the reservation counts them all,
// so the token limit holds.
func TestWorkMultipliersAreReserved(t *testing.T) {
	const budget = 20000
	e := startTier(t, "tokens 20000/10000h", "max_tokens 256")
	key, _ := e.meteredKey(t)
	e.upstream.Reset()
	auth := http.Header{"Authorization": {"Bearer " + key}}
	prompts := `["Say hi"` + strings.Repeat(`,"Say hi"`, 99) + `]`

	// 100 prompts × 256 tokens is past the whole budget: refused, not
	// admitted at a 400-token reservation to produce 25,600.
	res := e.do(t, http.MethodPost, "/v1/completions",
		strings.NewReader(`{"model":"vigthoria-fast-1","max_tokens":256,"prompt":`+prompts+`}`), auth)
	wantAPIError(t, res, http.StatusTooManyRequests, "request_too_large")
	e.wantUpstreamCalls(t, 0)

	for _, tc := range []struct {
		name, body string
		choices    int64
	}{
		{"10 prompts", `{"model":"vigthoria-fast-1","max_tokens":256,"prompt":["a","b","c","d","e","f","g","h","i","j"]}`, 10},
		{"best_of 5", `{"model":"vigthoria-fast-1","max_tokens":256,"prompt":"a","best_of":5}`, 5},
		{"token arrays", `{"model":"vigthoria-fast-1","max_tokens":256,"prompt":[[1,2,3],[4,5,6],[7,8,9]],"n":2}`, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			res := e.do(t, http.MethodPost, "/v1/completions", strings.NewReader(tc.body), auth)
			var answer struct {
				Usage struct {
					CompletionTokens int64 `json:"completion_tokens"`
				} `json:"usage"`
			}
			if err := json.NewDecoder(res.Body).Decode(&answer); err != nil || res.StatusCode != http.StatusOK {
				t.Fatalf("%d %v", res.StatusCode, err)
			}
			if answer.Usage.CompletionTokens != tc.choices*256 {
				t.Fatalf("the upstream generated %d tokens, want %d", answer.Usage.CompletionTokens, tc.choices*256)
			}
			reserved := before.Limits.Tokens.Remaining - atoi(t, res.Header.Get("X-Ratelimit-Remaining-Tokens"))
			if reserved < tc.choices*256 {
				t.Errorf("reserved %d tokens for %d choices of 256", reserved, tc.choices)
			}
			t.Logf("reserved %d, generated %d", reserved, answer.Usage.CompletionTokens)
		})
	}
	u, _ := e.usage(t, key)
	if u.Limits.Tokens.Remaining < 0 || u.Today.TotalTokens > budget {
		t.Errorf("used %d tokens of a %d budget", u.Today.TotalTokens, budget)
	}
}

// TestLeavingEarlyIsCharged: a stream cut short is charged for every
// delta it carried, tool calls and reasoning included; a caller that
// leaves a whole answer after its request reached the upstream pays the
// reservation, as the upstream goes on and bills the answer.
func TestLeavingEarlyIsCharged(t *testing.T) {
	e, key := startFaults(t, time.Minute)
	auth := http.Header{"Authorization": {"Bearer " + key}}
	// 400 chunks of output, and for a tool call, the chunk naming it.
	for kind, streamed := range map[string]int64{standin.ToolCallDeltas: 401, standin.ReasoningDeltas: 400} {
		t.Run("stream of "+kind+" cut short", func(t *testing.T) {
			before := waitSettled(t, e, key)
			e.upstream.SetBehavior(standin.Behavior{Deltas: kind, FailMidStream: 400})
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(
				`{"model":"vigthoria-fast-1","max_tokens":1000,"stream":true,"messages":[{"role":"user","content":"hi"}]}`), auth)
			wantErrorEvent(t, res, "upstream_stream_failed")
			e.upstream.SetBehavior(standin.Behavior{})
			u := waitSettled(t, e, key)
			prompt := u.Today.PromptTokens - before.Today.PromptTokens
			completion := u.Today.CompletionTokens - before.Today.CompletionTokens
			if completion != streamed || prompt <= 0 || prompt > 100 {
				t.Errorf("charged %d prompt and %d completion tokens, want the %d streamed and the prompt's estimate", prompt, completion, streamed)
			}
		})
	}
}

// TestLeavingAWholeAnswerPaysTheReservation: five requests of max_tokens
// 4000 whose caller left before the upstream's headers, once the upstream
// had them, and whose calls were cut past detached_timeout, are charged
// their reservation, not nothing.
func TestLeavingAWholeAnswerPaysTheReservation(t *testing.T) {
	e := start(t, manyFailures, faultTier, "detached 8 timeout 300ms")
	key, _ := e.meteredKey(t)
	var total int64
	for range 5 {
		before := waitSettled(t, e, key)
		e.upstream.SetBehavior(standin.Behavior{Latency: time.Minute})
		ctx, cancel := context.WithCancel(t.Context())
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, e.caddy.URL+"/v1/chat/completions", strings.NewReader(
			`{"model":"vigthoria-fast-1","max_tokens":4000,"messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer "+key)
		done := make(chan struct{})
		go func() {
			defer close(done)
			if res, err := http.DefaultClient.Do(req); err == nil {
				res.Body.Close()
			}
		}()
		eventually(t, "the upstream has the request", func() bool { return e.upstream.Active() == 1 })
		cancel()
		<-done
		eventually(t, "the upstream request ends", func() bool { return e.upstream.Active() == 0 })
		e.upstream.SetBehavior(standin.Behavior{})
		var u usageAnswer
		eventually(t, "the request is settled", func() bool {
			u, _ = e.usage(t, key)
			return u.Limits.Concurrent.InFlight == 0
		})
		charged := before.Limits.Tokens.Remaining - u.Limits.Tokens.Remaining
		total += charged
		if charged < 4000 {
			t.Errorf("charged %d tokens, want the reservation of at least 4000", charged)
		}
	}
	t.Logf("five requests left before their headers were charged %d tokens", total)
	// The upstream failing before its headers, the caller waiting, still
	// costs nothing: TestUpstreamFaults.
}
