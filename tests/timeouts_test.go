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
// until the upstream answers (a silence past idle_timeout then does not
// cut it): it is charged what the upstream reports.
// A caller who can make answers that slow is not served free, and one
// whose answers are slow for the upstream's own reasons pays what the
// upstream bills, not a bound. The official SDK's default path (no
// max_tokens, two retries of a 504) is charged each attempt the upstream
// answered.
func TestHeaderTimeoutChargesWhatTheUpstreamBills(t *testing.T) {
	noGoroutinesOutlive(t)
	e := start(t, manyFailures, faultTier, openTier, "header_timeout "+headerTimeout.String(), "idle_timeout "+headerTimeout.String())
	key, _ := e.meteredKey(t)
	auth := http.Header{"Authorization": {"Bearer " + key}}
	late := standin.Behavior{Latency: headerLate, PromptTokens: hangPrompt}

	for _, tc := range []struct {
		name, body string
		behavior   standin.Behavior
	}{
		{"a JSON answer", hangChat, late},
		{"a stream", hangStream, late},
		// Once it goes on, idle_timeout no longer cuts it.
		{"a stream, late and then silent", hangStream, standin.Behavior{Latency: headerLate, Think: headerLate / 2, PromptTokens: hangPrompt}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			billedPrompt, billedCompletion := e.upstream.Billed()
			e.upstream.SetBehavior(tc.behavior)
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

			waitFor(t, 3*headerLate, "the upstream answers", func() bool { return e.upstream.Active() == 0 })
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

// TestIdleStreamChargesWhatTheUpstreamBills: a stream whose model
// reasons, silent, past idle_timeout. Its caller's stream ends at the
// silence with an upstream_stream_failed event, and its call goes on,
// detached, holding the caller's slot, until the upstream's end: it is
// charged what the upstream reports, reasoning and all, not the prompt's
// estimate and the output the caller saw. The SDK's default path (no
// max_tokens) is charged the same way.
func TestIdleStreamChargesWhatTheUpstreamBills(t *testing.T) {
	noGoroutinesOutlive(t)
	e := start(t, manyFailures, faultTier, "idle_timeout "+headerTimeout.String())
	key, client := e.meteredKey(t)
	auth := http.Header{"Authorization": {"Bearer " + key}}
	for _, tc := range []struct {
		name string
		read func(t *testing.T)
	}{
		{"raw", func(t *testing.T) {
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(hangStream), auth)
			wantErrorEvent(t, res, "upstream_stream_failed")
		}},
		{"openai-go", func(t *testing.T) {
			stream := client.Chat.Completions.NewStreaming(t.Context(), chatParams("hi"))
			defer stream.Close()
			for stream.Next() {
			}
			if err := stream.Err(); err == nil || !strings.Contains(err.Error(), "upstream") {
				t.Errorf("the stream ended with %v, want the proxy's error event", err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			billedPrompt, billedCompletion := e.upstream.Billed()
			e.upstream.SetBehavior(standin.Behavior{Think: headerLate, PromptTokens: hangPrompt})
			tc.read(t)
			if e.upstream.Active() != 1 {
				t.Error("the upstream call ended with the caller's stream")
			}
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(`{"messages":[]}`), auth)
			wantAPIError(t, res, http.StatusTooManyRequests, "rate_limit_exceeded")

			waitFor(t, 2*headerLate, "the upstream answers", func() bool { return e.upstream.Active() == 0 })
			e.upstream.SetBehavior(standin.Behavior{})
			u := waitSettled(t, e, key)
			p, c := e.upstream.Billed()
			if p-billedPrompt != hangPrompt || c == billedCompletion {
				t.Errorf("the upstream counted %d prompt and %d completion tokens, want %d and some: the call did not go on to its end",
					p-billedPrompt, c-billedCompletion, hangPrompt)
			}
			wantCharged(t, u, before, 1, p-billedPrompt, c-billedCompletion)
		})
	}
}

// TestAnsweredEarlyCutIsChargedTheBound: a request past header_timeout,
// or a stream silent past idle_timeout, that may not go on (no detached
// call free) or outlives detached_timeout is cut, and charged the most
// the upstream may bill for it, as a call whose caller left: the upstream
// received it.
func TestAnsweredEarlyCutIsChargedTheBound(t *testing.T) {
	timeout := headerTimeout.String()
	// The stream's body as forwarded: stream_options.include_usage added.
	streamBound := int64(len(hangStream) + len(`,"stream_options":{"include_usage":true}`))
	for _, tc := range []struct {
		name     string
		config   []string
		behavior standin.Behavior
		body     string
		bound    int64
	}{
		{"headers, no detached call free", []string{"header_timeout " + timeout, "detached off"},
			standin.Behavior{Latency: time.Minute}, hangChat, int64(len(hangChat))},
		{"headers, past detached_timeout", []string{"header_timeout " + timeout, "detached 8 timeout 300ms"},
			standin.Behavior{StallHeaders: true}, hangChat, int64(len(hangChat))},
		{"a silent stream, no detached call free", []string{"idle_timeout " + timeout, "detached off"},
			standin.Behavior{Think: time.Minute}, hangStream, streamBound},
		{"a silent stream, past detached_timeout", []string{"idle_timeout " + timeout, "detached 8 timeout 300ms"},
			standin.Behavior{Think: time.Minute}, hangStream, streamBound},
		{"a stream stalled midway, past detached_timeout", []string{"idle_timeout " + timeout, "detached 8 timeout 300ms"},
			standin.Behavior{StallMidBody: 3}, hangStream, streamBound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := start(t, append([]string{manyFailures, faultTier}, tc.config...)...)
			key, _ := e.meteredKey(t)
			before, _ := e.usage(t, key)
			e.upstream.SetBehavior(tc.behavior)
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(tc.body),
				http.Header{"Authorization": {"Bearer " + key}})
			if tc.body == hangStream {
				wantErrorEvent(t, res, "upstream_stream_failed")
			} else {
				wantAPIError(t, res, http.StatusGatewayTimeout, "upstream_timeout")
			}
			waitFor(t, 5*time.Second, "the upstream call is cut", func() bool { return e.upstream.Active() == 0 })
			e.upstream.SetBehavior(standin.Behavior{})
			wantCharged(t, waitSettled(t, e, key), before, 1, tc.bound, 40)
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

// TestHeaderTimeoutBurstFromOneCaller: one caller, on a tier without a
// concurrency limit, sends twenty slow requests at once. Each is answered
// 504; only its per_caller share of detached calls goes on and is charged
// what the upstream reports, every other is cut and charged the bound, so
// the burst costs the caller at least what the upstream counted, and no
// detached call is left running.
func TestHeaderTimeoutBurstFromOneCaller(t *testing.T) {
	const burst, share = 20, 4
	e := start(t, manyFailures, "tier burst {\n\t\t\ttokens "+strconv.Itoa(faultTokens)+"/10000h\n\t\t}",
		"header_timeout "+headerTimeout.String(), "detached 256 per_caller "+strconv.Itoa(share))
	_, key := e.addKey(t, "burst")
	e.waitKeysKnown(t)
	before, _ := e.usage(t, key)
	billedPrompt, billedCompletion := e.upstream.Billed()
	// Long enough that every request of the burst passes header_timeout
	// while the share's calls still run.
	e.upstream.SetBehavior(standin.Behavior{Latency: 3 * time.Second, PromptTokens: hangPrompt})
	statuses := make(chan int, burst)
	for range burst {
		go func() {
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(hangChat),
				http.Header{"Authorization": {"Bearer " + key}})
			res.Body.Close()
			statuses <- res.StatusCode
		}()
	}
	for range burst {
		if s := <-statuses; s != http.StatusGatewayTimeout {
			t.Errorf("a request of the burst got %d, want 504", s)
		}
	}
	waitFor(t, 10*time.Second, "the upstream ends its answers", func() bool { return e.upstream.Active() == 0 })
	var u usageAnswer
	waitFor(t, 5*time.Second, "the burst is settled", func() bool {
		u, _ = e.usage(t, key)
		return u.Today.Requests-before.Today.Requests == burst
	})
	p, c := e.upstream.Billed()
	if p-billedPrompt != share*hangPrompt || c-billedCompletion != share*40 {
		t.Errorf("the upstream counted %d prompt and %d completion tokens, want the %d calls of the share answered",
			p-billedPrompt, c-billedCompletion, share)
	}
	cut := int64(burst - share)
	wantCharged(t, u, before, burst, share*hangPrompt+cut*int64(len(hangChat)), burst*40)
	if n := metricValue(t, e, "vigthoria_detached_calls"); n != 0 {
		t.Errorf("%v detached calls still running", n)
	}
}
