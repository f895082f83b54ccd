package tests

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"go.uber.org/goleak"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// hangPrompt is the prompt count the upstream reports in the hang-up
// tests: far above what the request's bytes suggest (bytes/4 is about
// 25), as the API counts an image, a file or a dense script.
const hangPrompt = 5000

// The requests of the hang-up tests: 40 tokens, which the upstream
// generates slowly (see hangBehavior).
const (
	hangChat   = `{"model":"vigthoria-fast-1","max_tokens":40,"messages":[{"role":"user","content":"hi"}]}`
	hangStream = `{"model":"vigthoria-fast-1","max_tokens":40,"stream":true,"messages":[{"role":"user","content":"hi"}]}`
)

// A caller leaves at one of these moments.
const (
	beforeHeaders = iota // the upstream is thinking; nothing was answered
	afterHeaders         // a stream's headers came; nothing read
	midStream            // 150 bytes of a stream were read
)

// leaveRaw sends body with key over plain HTTP and hangs up at the
// moment given, once the upstream is answering.
func leaveRaw(t *testing.T, e *env, key, body string, when int) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.caddy.URL+"/v1/chat/completions", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	if when == beforeHeaders {
		go func() {
			if res, err := http.DefaultClient.Do(req); err == nil {
				res.Body.Close()
			}
		}()
		eventually(t, "the upstream is answering", func() bool { return e.upstream.Active() == 1 })
		time.Sleep(50 * time.Millisecond)
		return
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want a stream", res.StatusCode)
	}
	if when == midStream {
		if _, err := io.ReadFull(res.Body, make([]byte, 150)); err != nil {
			t.Fatal(err)
		}
	}
}

// leaveSDK sends the request with the official client and cancels it at
// the moment given.
func leaveSDK(t *testing.T, e *env, key string, stream bool, when int) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	client := newClient(e.caddy.URL, key)
	params := chatParams("hi")
	params.MaxTokens = openai.Int(40)
	if !stream {
		done := make(chan struct{})
		go func() {
			defer close(done)
			if _, err := client.Chat.Completions.New(ctx, params); err == nil {
				t.Error("the cancelled request was answered")
			}
		}()
		eventually(t, "the upstream is answering", func() bool { return e.upstream.Active() == 1 })
		time.Sleep(50 * time.Millisecond)
		cancel()
		<-done
		return
	}
	s := client.Chat.Completions.NewStreaming(ctx, params)
	defer s.Close()
	for range 3 {
		if !s.Next() {
			t.Fatalf("the stream ended early: %v", s.Err())
		}
	}
}

// TestLeavingEarlyNeverCostsLess: callers that hang up before the
// answer's headers, after them and mid-stream, over plain HTTP and with
// the official client, while the upstream counts 5,000 prompt tokens a
// request and generates slowly. The upstream's call goes on to its end,
// each request is charged exactly what the upstream counted, its caller's
// one concurrency slot stays taken until the upstream is done, and no
// goroutine outlives the requests.
func TestLeavingEarlyNeverCostsLess(t *testing.T) {
	noGoroutinesOutlive(t)
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := startOn(t, up, srv, srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", manyFailures, faultTier)
	key, _ := e.meteredKey(t)

	var charged, billed [2]int64
	for _, tc := range []struct {
		name  string
		slow  standin.Behavior
		leave func(t *testing.T)
	}{
		{"raw, before a JSON answer's headers", standin.Behavior{Latency: 1500 * time.Millisecond},
			func(t *testing.T) { leaveRaw(t, e, key, hangChat, beforeHeaders) }},
		{"raw, before a stream's headers", standin.Behavior{Latency: 1500 * time.Millisecond},
			func(t *testing.T) { leaveRaw(t, e, key, hangStream, beforeHeaders) }},
		{"raw, after a stream's headers", standin.Behavior{ChunkDelay: 30 * time.Millisecond},
			func(t *testing.T) { leaveRaw(t, e, key, hangStream, afterHeaders) }},
		{"raw, mid-stream", standin.Behavior{ChunkDelay: 30 * time.Millisecond},
			func(t *testing.T) { leaveRaw(t, e, key, hangStream, midStream) }},
		{"openai-go, before the answer", standin.Behavior{Latency: 1500 * time.Millisecond},
			func(t *testing.T) { leaveSDK(t, e, key, false, beforeHeaders) }},
		{"openai-go, mid-stream", standin.Behavior{ChunkDelay: 30 * time.Millisecond},
			func(t *testing.T) { leaveSDK(t, e, key, true, midStream) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			billedPrompt, billedCompletion := up.Billed()
			b := tc.slow
			b.PromptTokens = hangPrompt
			up.SetBehavior(b)
			tc.leave(t)
			left := time.Now()

			// The proxy has heard the caller go; the upstream still works.
			time.Sleep(100 * time.Millisecond)
			if up.Active() != 1 {
				t.Errorf("the upstream call ended with its caller (%v after it left)", time.Since(left).Round(time.Millisecond))
			}
			if u, _ := e.usage(t, key); u.Limits.Concurrent.InFlight != 1 {
				t.Errorf("in flight %d while the upstream still answers, want its slot taken", u.Limits.Concurrent.InFlight)
			}
			// Its slot is taken: the concurrency limit refuses the next
			// request before reading its body (which, naming no model,
			// would never reach the upstream anyway).
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(`{"messages":[]}`), http.Header{"Authorization": {"Bearer " + key}})
			wantAPIError(t, res, http.StatusTooManyRequests, "rate_limit_exceeded")

			waitFor(t, 5*time.Second, "the upstream ends its answer", func() bool { return up.Active() == 0 })
			up.SetBehavior(standin.Behavior{})
			u := waitSettled(t, e, key)
			p, c := up.Billed()
			wantPrompt, wantCompletion := p-billedPrompt, c-billedCompletion
			gotPrompt, gotCompletion := u.Today.PromptTokens-before.Today.PromptTokens, u.Today.CompletionTokens-before.Today.CompletionTokens
			charged[0], charged[1] = charged[0]+gotPrompt, charged[1]+gotCompletion
			billed[0], billed[1] = billed[0]+wantPrompt, billed[1]+wantCompletion
			if gotPrompt != wantPrompt || gotCompletion != wantCompletion {
				t.Errorf("charged %d prompt and %d completion tokens, the upstream counted %d and %d",
					gotPrompt, gotCompletion, wantPrompt, wantCompletion)
			}
		})
	}
	t.Logf("charged %d prompt + %d completion tokens; the upstream counted %d + %d, and wrote %d completion tokens out",
		charged[0], charged[1], billed[0], billed[1], up.Written())

}

// noGoroutinesOutlive checks, last, once Caddy, the upstream and every
// answer's body are closed, that nothing of the test's requests still
// runs: no detached call, watch or timer. Call it first.
func noGoroutinesOutlive(t *testing.T) {
	baseline := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		http.DefaultClient.CloseIdleConnections()
		if err := goleak.Find(baseline,
			goleak.IgnoreAnyFunction("github.com/caddyserver/caddy/v2.replaceLocalAdminServer.func2"),
			goleak.IgnoreTopFunction("github.com/DeRuina/timberjack.(*Logger).millRun"),
			goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
		); err != nil {
			t.Errorf("goroutines outlive the requests: %v", err)
		}
	})
}

// TestLeavingWithNoDetachedCallFree: with no detached call free
// (detached off), a caller who leaves mid-stream has its upstream call
// cut at once, which spares the upstream the rest of the answer, and is
// charged the most the upstream may bill for a text prompt: each byte of
// the body as a prompt token, and all the output it reserved. The cut is
// counted in vigthoria_detached_refused_total.
func TestLeavingWithNoDetachedCallFree(t *testing.T) {
	e := start(t, manyFailures, faultTier, "detached off")
	key, _ := e.meteredKey(t)
	refusedBefore := metricValue(t, e, "vigthoria_detached_refused_total")
	before, _ := e.usage(t, key)
	billedPrompt, billedCompletion := e.upstream.Billed()
	e.upstream.SetBehavior(standin.Behavior{ChunkDelay: 30 * time.Millisecond})
	leaveRaw(t, e, key, hangStream, midStream)
	left := time.Now()
	waitFor(t, 2*time.Second, "the upstream call is cut", func() bool { return e.upstream.Active() == 0 })
	t.Logf("the upstream call ended %v after its caller left, having written %d of 40 tokens",
		time.Since(left).Round(time.Millisecond), e.upstream.Written())
	if w := e.upstream.Written(); w >= 40 {
		t.Errorf("the upstream wrote its whole answer (%d tokens) for a caller who left", w)
	}
	u := waitSettled(t, e, key)
	p, c := e.upstream.Billed()
	gotPrompt, gotCompletion := u.Today.PromptTokens-before.Today.PromptTokens, u.Today.CompletionTokens-before.Today.CompletionTokens
	// The body as forwarded: stream_options.include_usage added.
	bound := int64(len(hangStream) + len(`,"stream_options":{"include_usage":true}`))
	if gotPrompt != bound || gotCompletion != 40 {
		t.Errorf("charged %d prompt and %d completion tokens, want the bound: %d and 40", gotPrompt, gotCompletion, bound)
	}
	if gotPrompt < p-billedPrompt || gotCompletion < c-billedCompletion {
		t.Errorf("charged %d + %d, less than the upstream counted: %d + %d", gotPrompt, gotCompletion, p-billedPrompt, c-billedCompletion)
	}
	if got := metricValue(t, e, "vigthoria_detached_refused_total"); got != refusedBefore+1 {
		t.Errorf("vigthoria_detached_refused_total went from %v to %v, want one more", refusedBefore, got)
	}
}

// TestDetachedCallSettlesAtShutdown: a call whose caller left, or was
// answered 504 at header_timeout, is still running when Caddy stops. The
// last config using the store waits for it and its usage reaches the
// ledger before the store closes; one still running after the 15 seconds
// of grace is cut and settled with its bound. Either is charged once.
func TestDetachedCallSettlesAtShutdown(t *testing.T) {
	for _, tc := range []struct {
		name     string
		latency  time.Duration
		cut      bool
		answered bool // at header_timeout, instead of leaving
	}{
		{"within the grace", time.Second, false, false},
		{"past the grace", time.Minute, true, false},
		{"answered 504, within the grace", time.Second, false, true},
		{"answered 504, past the grace", time.Minute, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			config := []string{manyFailures, faultTier}
			if tc.answered {
				config = append(config, "header_timeout "+headerTimeout.String())
			}
			e := start(t, config...)
			id, key := e.addKey(t, "metered")
			e.waitKeysKnown(t)
			e.upstream.SetBehavior(standin.Behavior{Latency: tc.latency, PromptTokens: hangPrompt})
			if tc.answered {
				res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(hangChat),
					http.Header{"Authorization": {"Bearer " + key}})
				wantAPIError(t, res, http.StatusGatewayTimeout, "upstream_timeout")
			} else {
				leaveRaw(t, e, key, hangChat, beforeHeaders)
			}
			e.caddy.Stop(t)
			if e.upstream.Active() != 0 {
				t.Error("Caddy stopped while a detached call still ran")
			}
			prompt, completion := e.upstream.Billed()
			if tc.cut {
				prompt, completion = int64(len(hangChat)), 40
			}
			out := e.cli(t, "usage", id)
			want := regexp.MustCompile(`\b1\s+` + strconv.FormatInt(prompt, 10) + `\s+0\s+` + strconv.FormatInt(completion, 10) + `\b`)
			if !want.MatchString(out) {
				t.Errorf("the ledger after the shutdown:\n%s\nwant 1 request of %d prompt and %d completion tokens", out, prompt, completion)
			}
		})
	}
}

// metricValue reads a series (a name, with its labels if any) from
// Caddy's admin API; 0 when it has none yet.
func metricValue(t *testing.T, e *env, name string) float64 {
	t.Helper()
	res, err := http.Get(e.caddy.AdminURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return 0
}

// TestDetachedCallsAtOnce: six callers hang up mid-stream at once while
// only two calls may go on detached: two are charged what the upstream
// reports, four are cut and charged the bound, none less than the
// upstream counted; the process's detached calls are back to none after.
func TestDetachedCallsAtOnce(t *testing.T) {
	e := start(t, manyFailures, "detached 2")
	keys := make([]string, 6)
	for i := range keys {
		_, keys[i] = e.addKey(t, "pro")
	}
	e.waitKeysKnown(t)
	refusedBefore := metricValue(t, e, "vigthoria_detached_refused_total")
	e.upstream.SetBehavior(standin.Behavior{ChunkDelay: 30 * time.Millisecond})
	done := make(chan struct{})
	for _, key := range keys {
		go func() {
			defer func() { done <- struct{}{} }()
			leaveRaw(t, e, key, hangStream, midStream)
		}()
	}
	for range keys {
		<-done
	}
	waitFor(t, 5*time.Second, "the upstream ends its answers", func() bool { return e.upstream.Active() == 0 })
	bound := int64(len(hangStream)+len(`,"stream_options":{"include_usage":true}`)) + 40
	var full, cut, total int64
	for _, key := range keys {
		var u usageAnswer
		eventually(t, "the request is settled", func() bool {
			u, _ = e.usage(t, key)
			return u.Today.Requests == 1
		})
		switch u.Today.TotalTokens {
		case 4 + 40: // the stand-in's count: "hi" and 3 for the message
			full++
		case bound:
			cut++
		default:
			t.Errorf("a caller was charged %d tokens, want its upstream count (44) or the bound (%d)", u.Today.TotalTokens, bound)
		}
		total += u.Today.TotalTokens
	}
	prompt, completion := e.upstream.Billed()
	t.Logf("%d callers charged the upstream's count, %d the bound; %d tokens charged, %d counted", full, cut, total, prompt+completion)
	if full != 2 || cut != 4 || total < prompt+completion {
		t.Errorf("%d detached and %d cut, %d tokens charged for %d counted; want 2 and 4, and never less", full, cut, total, prompt+completion)
	}
	if got := metricValue(t, e, "vigthoria_detached_refused_total"); got != refusedBefore+4 {
		t.Errorf("vigthoria_detached_refused_total went from %v to %v, want 4 more", refusedBefore, got)
	}
	if got := metricValue(t, e, "vigthoria_detached_calls"); got != 0 {
		t.Errorf("vigthoria_detached_calls is %v once every call ended, want 0", got)
	}
}

// TestDetachedCallOutlivesAReload: a call whose caller left goes on across
// a config reload to the same store, and is charged what the upstream
// counted.
func TestDetachedCallOutlivesAReload(t *testing.T) {
	e := start(t, manyFailures, faultTier)
	key, _ := e.meteredKey(t)
	e.upstream.SetBehavior(standin.Behavior{Latency: time.Second, PromptTokens: hangPrompt})
	leaveRaw(t, e, key, hangChat, beforeHeaders)
	e.reload(t, manyFailures, faultTier, "models_cache 1m")
	waitFor(t, 5*time.Second, "the upstream ends its answer", func() bool { return e.upstream.Active() == 0 })
	u := waitSettled(t, e, key)
	prompt, completion := e.upstream.Billed()
	if u.Today.PromptTokens != prompt || u.Today.CompletionTokens != completion {
		t.Errorf("charged %d + %d, the upstream counted %d + %d", u.Today.PromptTokens, u.Today.CompletionTokens, prompt, completion)
	}
}

// TestNoRetryForACallerWhoLeft: a caller who leaves while the upstream
// is still on an attempt that then fails with a 503 gets no retry made
// for it, though its call went on detached, and is charged nothing: the
// answered attempt billed nothing.
func TestNoRetryForACallerWhoLeft(t *testing.T) {
	e := start(t, manyFailures, faultTier, "retries 2 max_wait 10s")
	key, _ := e.meteredKey(t)
	e.upstream.SetBehavior(standin.Behavior{Latency: 500 * time.Millisecond, FailStatus: http.StatusServiceUnavailable, FailCount: 1})
	leaveRaw(t, e, key, hangChat, beforeHeaders)
	waitFor(t, 5*time.Second, "the upstream answered", func() bool { return e.upstream.Active() == 0 })
	time.Sleep(500 * time.Millisecond) // a retry would be on its way
	u := waitSettled(t, e, key)
	if n := e.upstream.Count(); n != 1 {
		t.Errorf("the upstream got %d requests, want 1: no retry for a caller who left", n)
	}
	if u.Today.TotalTokens != 0 {
		t.Errorf("charged %d tokens, want none", u.Today.TotalTokens)
	}
}

// TestOneCallerCannotTakeEveryDetachedCall: caller A, of a tier with no
// concurrency limit, hangs up four streams at once where four calls may
// go on detached, one of them per caller (the default share of 4): one
// of A's goes on, three are cut and charged A the bound. Then caller B
// hangs up one stream: its call still finds room, goes on detached and
// is charged exactly what the upstream counted, not the bound.
func TestOneCallerCannotTakeEveryDetachedCall(t *testing.T) {
	e := start(t, manyFailures, "detached 4")
	_, a := e.addKey(t, "pro")
	_, b := e.addKey(t, "pro")
	e.waitKeysKnown(t)
	e.upstream.SetBehavior(standin.Behavior{ChunkDelay: 60 * time.Millisecond})
	done := make(chan struct{})
	for range 4 {
		go func() {
			defer func() { done <- struct{}{} }()
			leaveRaw(t, e, a, hangStream, midStream)
		}()
	}
	for range 4 {
		<-done
	}
	// Each of A's calls went on detached or was cut: the upstream runs
	// just the detached ones.
	waitFor(t, 2*time.Second, "A's calls are detached or cut", func() bool {
		return metricValue(t, e, "vigthoria_detached_calls") == float64(e.upstream.Active())
	})
	t.Logf("A's calls: %v detached", metricValue(t, e, "vigthoria_detached_calls"))
	leaveRaw(t, e, b, hangStream, midStream)
	waitFor(t, 10*time.Second, "the upstream ends its answers", func() bool { return e.upstream.Active() == 0 })

	const full = 4 + 40 // the stand-in's count: "hi" and 3 for the message, and 40 out
	bound := int64(len(hangStream)+len(`,"stream_options":{"include_usage":true}`)) + 40
	var ua, ub usageAnswer
	eventually(t, "the requests are settled", func() bool {
		ua, _ = e.usage(t, a)
		ub, _ = e.usage(t, b)
		return ua.Today.Requests == 4 && ub.Today.Requests == 1
	})
	t.Logf("B charged %d tokens (the upstream counted %d, the bound is %d); A charged %d for 4 calls",
		ub.Today.TotalTokens, full, bound, ua.Today.TotalTokens)
	if ub.Today.PromptTokens != 4 || ub.Today.CompletionTokens != 40 {
		t.Errorf("B charged %d prompt and %d completion tokens, want what the upstream counted: 4 and 40",
			ub.Today.PromptTokens, ub.Today.CompletionTokens)
	}
	if want := full + 3*bound; ua.Today.TotalTokens != want {
		t.Errorf("A charged %d tokens for 4 calls, want one detached and three cut: %d", ua.Today.TotalTokens, want)
	}
	if got := metricValue(t, e, "vigthoria_detached_calls"); got != 0 {
		t.Errorf("vigthoria_detached_calls is %v once every call ended, want 0", got)
	}
}
