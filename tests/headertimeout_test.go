package tests

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// The header_timeout of these tests, and how late past it the upstream
// answers: long enough that the call is still running when the test
// looks, on a busy machine too.
const (
	headerTimeout = 300 * time.Millisecond
	headerLate    = 2 * time.Second
)

// openTier is faultTier with room for the SDK's retries in flight.
var openTier = "tier open {\n\t\t\ttokens " + strconv.Itoa(faultTokens) + "/10000h\n\t\t\tconcurrent 8\n\t\t}"

// TestHeaderTimeoutChargesWhatTheUpstreamBills: a request the upstream
// received and answers past header_timeout. Its caller has its 504 at the
// timeout, and its call goes on, detached, holding the caller's slot,
// until the upstream answers: it is charged what the upstream reports.
// A caller who can make answers that slow is not served free, and one
// whose answers are slow for the upstream's own reasons pays what the
// upstream bills, not a bound. The official SDK's default path (no
// max_tokens, two retries of a 504) is charged each attempt the upstream
// answered.
func TestHeaderTimeoutChargesWhatTheUpstreamBills(t *testing.T) {
	noGoroutinesOutlive(t)
	e := start(t, manyFailures, faultTier, openTier, "header_timeout "+headerTimeout.String())
	key, _ := e.meteredKey(t)
	auth := http.Header{"Authorization": {"Bearer " + key}}
	late := standin.Behavior{Latency: headerLate, PromptTokens: hangPrompt}

	for _, tc := range []struct{ name, body string }{
		{"a JSON answer", hangChat},
		{"a stream", hangStream},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			billedPrompt, billedCompletion := e.upstream.Billed()
			e.upstream.SetBehavior(late)
			began := time.Now()
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(tc.body), auth)
			wantAPIError(t, res, http.StatusGatewayTimeout, "upstream_timeout")
			t.Logf("answered 504 after %v", time.Since(began).Round(time.Millisecond))
			if e.upstream.Active() != 1 {
				t.Error("the upstream call ended with the caller's 504")
			}
			// Its slot is taken until the upstream answers.
			res = e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(`{"messages":[]}`), auth)
			wantAPIError(t, res, http.StatusTooManyRequests, "rate_limit_exceeded")

			waitFor(t, 2*headerLate, "the upstream answers", func() bool { return e.upstream.Active() == 0 })
			e.upstream.SetBehavior(standin.Behavior{})
			u := waitSettled(t, e, key)
			p, c := e.upstream.Billed()
			if p-billedPrompt != hangPrompt || c-billedCompletion != 40 {
				t.Errorf("the upstream counted %d prompt and %d completion tokens, want %d and 40: the call did not go on to its answer",
					p-billedPrompt, c-billedCompletion, hangPrompt)
			}
			wantCharged(t, u, before, 1, p-billedPrompt, c-billedCompletion)
		})
	}

	t.Run("the SDK's default path", func(t *testing.T) {
		_, open := e.addKey(t, "open")
		e.waitKeysKnown(t)
		client := openai.NewClient(option.WithBaseURL(e.caddy.URL+"/v1/"), option.WithAPIKey(open))
		before, _ := e.usage(t, open)
		billedPrompt, billedCompletion := e.upstream.Billed()
		calls := e.upstream.Count()
		e.upstream.SetBehavior(late)
		_, err := client.Chat.Completions.New(t.Context(), chatParams("hi"))
		wantOpenAIError(t, err, http.StatusGatewayTimeout, "upstream_timeout")
		if got := e.upstream.Count() - calls; got != 3 {
			t.Errorf("%d requests reached the upstream, want the SDK's first and its two retries", got)
		}
		waitFor(t, 2*headerLate, "the upstream answers", func() bool { return e.upstream.Active() == 0 })
		e.upstream.SetBehavior(standin.Behavior{})
		u := waitSettled(t, e, open)
		p, c := e.upstream.Billed()
		if p-billedPrompt != 3*hangPrompt || c == billedCompletion {
			t.Errorf("the upstream counted %d prompt and %d completion tokens, want %d and some: the calls did not go on",
				p-billedPrompt, c-billedCompletion, 3*hangPrompt)
		}
		wantCharged(t, u, before, 3, p-billedPrompt, c-billedCompletion)
	})

	// The upstream's own failure after the 504 bills nothing, as when
	// its caller waits for it.
	// The ledger counts the request that had an answer of the upstream's
	// (as when its caller waits), not the one that had none.
	for _, tc := range []struct {
		name     string
		behavior standin.Behavior
		requests int64
	}{
		{"an error status", standin.Behavior{Latency: headerLate, FailStatus: http.StatusInternalServerError}, 1},
		{"a reset mid-answer", standin.Behavior{Latency: headerLate, ResetMidBody: 1}, 0},
	} {
		t.Run("then "+tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			e.upstream.SetBehavior(tc.behavior)
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(hangChat), auth)
			wantAPIError(t, res, http.StatusGatewayTimeout, "upstream_timeout")
			waitFor(t, 2*headerLate, "the upstream answers", func() bool { return e.upstream.Active() == 0 })
			e.upstream.SetBehavior(standin.Behavior{})
			wantCharged(t, waitSettled(t, e, key), before, tc.requests, 0, 0)
		})
	}
}

// TestHeaderTimeoutCutIsChargedTheBound: a request past header_timeout
// that may not go on (no detached call free) or outlives
// detached_timeout is cut, and charged the most the upstream may bill
// for it, as a call whose caller left: the upstream received it.
func TestHeaderTimeoutCutIsChargedTheBound(t *testing.T) {
	for _, tc := range []struct {
		name, detached string
		behavior       standin.Behavior
	}{
		{"no detached call free", "detached off", standin.Behavior{Latency: time.Minute}},
		{"past detached_timeout", "detached 8 timeout 300ms", standin.Behavior{StallHeaders: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, manyFailures, faultTier, tc.detached, "header_timeout "+headerTimeout.String())
			key, _ := e.meteredKey(t)
			before, _ := e.usage(t, key)
			e.upstream.SetBehavior(tc.behavior)
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(hangChat),
				http.Header{"Authorization": {"Bearer " + key}})
			wantAPIError(t, res, http.StatusGatewayTimeout, "upstream_timeout")
			waitFor(t, 5*time.Second, "the upstream call is cut", func() bool { return e.upstream.Active() == 0 })
			e.upstream.SetBehavior(standin.Behavior{})
			wantCharged(t, waitSettled(t, e, key), before, 1, int64(len(hangChat)), 40)
		})
	}
}

// wantCharged checks what the ledger counts since before: requests, and
// prompt and completion tokens.
func wantCharged(t *testing.T, u, before usageAnswer, requests, prompt, completion int64) {
	t.Helper()
	gotRequests := u.Today.Requests - before.Today.Requests
	gotPrompt, gotCompletion := u.Today.PromptTokens-before.Today.PromptTokens, u.Today.CompletionTokens-before.Today.CompletionTokens
	if gotRequests != requests || gotPrompt != prompt || gotCompletion != completion {
		t.Errorf("charged %d requests, %d prompt and %d completion tokens; want %d, %d and %d",
			gotRequests, gotPrompt, gotCompletion, requests, prompt, completion)
	}
}
