package tests

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// faultTimeout is both header_timeout and idle_timeout in the fault
// suite, short so that a stall ends soon.
const faultTimeout = 500 * time.Millisecond

// faultBound is how long a fault may take to be answered: its timeout, the
// retries' waits, and room for a busy machine. It tells "answered in
// time" from "hung", not a performance goal.
const faultBound = faultTimeout + 5*time.Second

// faultTokens is the metered tier's token budget, so long in refilling
// that every token charged in a test stays visible.
const faultTokens = 100000

// faultTier is the metered tier: one request in flight, and faultTokens.
var faultTier = "tier metered {\n\t\t\ttokens " + strconv.Itoa(faultTokens) + "/10000h\n\t\t\tconcurrent 1\n\t\t}"

// startFaults runs Caddy with a short header_timeout, the idle_timeout
// given, and a metered key of one concurrent request and a token budget,
// returned with the env.
func startFaults(t *testing.T, idle time.Duration) (*env, string) {
	t.Helper()
	e := start(t, manyFailures, "header_timeout "+faultTimeout.String(), "idle_timeout "+idle.String(),
		faultTier)
	key, _ := e.meteredKey(t)
	return e, key
}

const (
	faultChat   = `{"model":"vigthoria-fast-1","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}`
	faultStream = `{"model":"vigthoria-fast-1","max_tokens":10,"stream":true,"messages":[{"role":"user","content":"hi"}]}`
)

func TestUpstreamFaults(t *testing.T) {
	e, key := startFaults(t, faultTimeout)
	for _, tc := range []struct {
		name     string
		behavior standin.Behavior
		body     string
		status   int    // of the proxy's answer; 200 for a stream that had started
		code     string // in the error body, or in the stream's error event
		streamed int64  // content chunks the client got, and is charged for
		calls    int    // upstream attempts
	}{
		// A stall before the headers, or in a stream, is answered at
		// header_timeout or idle_timeout, and its call goes on
		// (TestHeaderTimeoutChargesWhatTheUpstreamBills,
		// TestIdleStreamChargesWhatTheUpstreamBills,
		// TestAnsweredEarlyCutIsChargedTheBound).
		{"stall mid-body", standin.Behavior{StallMidBody: 1}, faultChat, 504, "upstream_timeout", 0, 1},
		{"reset mid-body", standin.Behavior{ResetMidBody: 1}, faultChat, 502, "upstream_unavailable", 0, 1},
		{"reset mid-stream", standin.Behavior{ResetMidBody: 3}, faultStream, 200, "upstream_stream_failed", 3, 1},
		{"abort mid-stream", standin.Behavior{FailMidStream: 3}, faultStream, 200, "upstream_stream_failed", 3, 1},
		{"500", standin.Behavior{FailStatus: 500}, faultChat, 500, "upstream_error", 0, 1},
		{"503 after retries", standin.Behavior{FailStatus: 503, RetryAfter: 1}, faultChat, 503, "upstream_error", 0, 3},
		{"garbage", standin.Behavior{Garbage: true}, faultChat, 502, "upstream_bad_response", 0, 1},
		{"garbage for a stream", standin.Behavior{Garbage: true}, faultStream, 502, "upstream_bad_response", 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			e.upstream.SetBehavior(tc.behavior)
			calls := e.upstream.Count()
			began := time.Now()
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(tc.body),
				http.Header{"Authorization": {"Bearer " + key}})
			if tc.status == http.StatusOK {
				wantErrorEvent(t, res, tc.code)
			} else {
				wantAPIError(t, res, tc.status, tc.code)
			}
			took := time.Since(began)
			t.Logf("answered in %v", took.Round(time.Millisecond))
			if took > faultBound {
				t.Errorf("answered after %v, want within %v", took, faultBound)
			}
			if got := e.upstream.Count() - calls; got != tc.calls {
				t.Errorf("%d upstream attempts, want %d", got, tc.calls)
			}
			e.upstream.SetBehavior(standin.Behavior{})
			wantSettled(t, e, key, before, tc.streamed)
			// The one concurrent slot is free again.
			res = e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(faultChat),
				http.Header{"Authorization": {"Bearer " + key}})
			if res.StatusCode != http.StatusOK {
				t.Errorf("the next request got %d, want 200", res.StatusCode)
			}
		})
	}

	t.Run("refused connection", func(t *testing.T) {
		closed := "http://127.0.0.1:" + strconv.Itoa(harness.FreePort(t)) + "/v1"
		e := startOn(t, standin.New(standin.Options{APIKey: serverKey}), nil, closed, "{env.VIGTHORIA_TEST_KEY}",
			manyFailures, faultTier)
		key, _ := e.meteredKey(t)
		for _, body := range []string{faultChat, faultStream} {
			before, _ := e.usage(t, key)
			began := time.Now()
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(body),
				http.Header{"Authorization": {"Bearer " + key}})
			wantAPIError(t, res, http.StatusBadGateway, "upstream_unavailable")
			if took := time.Since(began); took > faultBound {
				t.Errorf("answered after %v, want within %v", took, faultBound)
			}
			wantSettled(t, e, key, before, 0)
		}
	})
}

// wantErrorEvent asserts res is a stream that ends cleanly with an error
// event of code, after whole events only, and without [DONE].
func wantErrorEvent(t *testing.T, res *http.Response, code string) {
	t.Helper()
	raw, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("the stream did not end cleanly: %v (got %q)", err, raw)
	}
	if res.StatusCode != http.StatusOK || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("status %d, Content-Type %q: want a started stream", res.StatusCode, res.Header.Get("Content-Type"))
	}
	events := strings.Split(strings.TrimSuffix(string(raw), "\n\n"), "\n\n")
	for i, ev := range events {
		if !strings.HasPrefix(ev, "data: {") || strings.Contains(ev, "\n") {
			t.Errorf("event %d is torn or malformed: %q", i, ev)
		}
	}
	if last := events[len(events)-1]; !strings.Contains(last, `"error":{`) || !strings.Contains(last, `"code":"`+code+`"`) {
		t.Errorf("last event = %q, want an error event with code %s", last, code)
	}
	if strings.Contains(string(raw), "[DONE]") {
		t.Error("a broken stream claims [DONE]")
	}
}

// wantSettled waits until the key's request is settled, and checks its
// charge: the prompt and the streamed chunks, or nothing when nothing was
// answered.
func wantSettled(t *testing.T, e *env, key string, before usageAnswer, streamed int64) {
	t.Helper()
	u := waitSettled(t, e, key)
	completion := u.Today.CompletionTokens - before.Today.CompletionTokens
	prompt := u.Today.PromptTokens - before.Today.PromptTokens
	if completion != streamed || (streamed > 0) != (prompt > 0) {
		t.Errorf("charged %d prompt and %d completion tokens, want the %d streamed (and the prompt with them)",
			prompt, completion, streamed)
	}
}

// waitSettled waits until no slot of the key is taken and its token
// reservation is replaced by the charge, and returns its usage then.
func waitSettled(t *testing.T, e *env, key string) usageAnswer {
	t.Helper()
	var u usageAnswer
	settled := func() bool {
		u, _ = e.usage(t, key)
		return u.Limits.Concurrent.InFlight == 0 &&
			u.Limits.Tokens.Remaining == faultTokens-u.Today.TotalTokens
	}
	deadline := time.Now().Add(2 * time.Second)
	for !settled() {
		if time.Now().After(deadline) {
			t.Fatalf("not settled: %d in flight, %d tokens remaining, %d used",
				u.Limits.Concurrent.InFlight, u.Limits.Tokens.Remaining, u.Today.TotalTokens)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return u
}

// TestClientDisconnectCutsUpstream: a call whose caller left is cut when
// it may not go on detached, at once with detached off, or after its
// detached_timeout; the caller is charged at least what it received (the
// bound of what the upstream may bill, see TestLeavingWithNoDetachedCallFree).
func TestClientDisconnectCutsUpstream(t *testing.T) {
	t.Run("detached off", func(t *testing.T) { testClientDisconnectCutsUpstream(t, "detached off") })
	t.Run("detached timeout", func(t *testing.T) { testClientDisconnectCutsUpstream(t, "detached 8 timeout 300ms") })
}

func testClientDisconnectCutsUpstream(t *testing.T, detached string) {
	e := start(t, manyFailures, "header_timeout "+faultTimeout.String(), "idle_timeout 1m", faultTier, detached)
	key, _ := e.meteredKey(t)
	for _, tc := range []struct {
		name     string
		behavior standin.Behavior
		body     string
	}{
		// A thousand tokens 50ms apart: the upstream would go on for 50s.
		{"mid-stream", standin.Behavior{ChunkDelay: 50 * time.Millisecond},
			`{"model":"vigthoria-fast-1","max_tokens":1000,"stream":true,"messages":[{"role":"user","content":"hi"}]}`},
		{"waiting for the answer", standin.Behavior{Latency: time.Minute}, faultChat},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			e.upstream.SetBehavior(tc.behavior)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.caddy.URL+"/v1/chat/completions", strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer "+key)
			got := make(chan int64, 1)
			go func() {
				var chunks int64
				defer func() { got <- chunks }()
				res, err := http.DefaultClient.Do(req)
				if err != nil {
					return
				}
				defer res.Body.Close()
				buf := make([]byte, 4096)
				for {
					n, err := res.Body.Read(buf)
					chunks += int64(strings.Count(string(buf[:n]), `"content":"`) - strings.Count(string(buf[:n]), `"content":""`))
					if err != nil {
						return
					}
				}
			}()
			eventually(t, "the upstream is answering", func() bool { return e.upstream.Active() == 1 })
			time.Sleep(300 * time.Millisecond) // a few chunks flow
			left := time.Now()
			cancel()
			deadline := left.Add(5 * time.Second)
			for e.upstream.Active() != 0 {
				if time.Now().After(deadline) {
					t.Fatal("the upstream request still runs 5s after the client left")
				}
				time.Sleep(time.Millisecond)
			}
			t.Logf("the upstream request ended %v after the client left", time.Since(left).Round(time.Millisecond))
			clientChunks := <-got
			e.upstream.SetBehavior(standin.Behavior{})
			u := waitSettled(t, e, key)
			// The proxy may have passed on a chunk or two the client never read.
			if charged := u.Today.CompletionTokens - before.Today.CompletionTokens; charged < clientChunks {
				t.Errorf("charged %d completion tokens, the client received %d", charged, clientChunks)
			}
			t.Logf("client received %d chunks, charged %d completion tokens", clientChunks, u.Today.CompletionTokens-before.Today.CompletionTokens)
		})
	}
}
