package tests

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// wantAPIHeaders asserts an API answer is not to be cached nor sniffed,
// and carries none of the upstream's caching headers.
func wantAPIHeaders(t *testing.T, res *http.Response) {
	t.Helper()
	if got := res.Header.Get("X-Content-Type-Options"); got != "nosniff" {
		t.Errorf("X-Content-Type-Options = %q, want nosniff", got)
	}
	if got := res.Header.Values("Cache-Control"); len(got) != 1 || got[0] != "no-store" {
		t.Errorf("Cache-Control = %q, want no-store alone", got)
	}
	for _, name := range []string{"Vary", "Expires", "Etag", "Last-Modified", "Set-Cookie", "Age", "Location"} {
		if v := res.Header.Values(name); len(v) > 0 {
			t.Errorf("the upstream's %s %q reached the caller", name, v)
		}
	}
}

// TestUpstreamAnswersHaveTheAPIsShape: whatever the upstream answers, the
// caller gets JSON or server-sent events in the API's shape, with nosniff
// and no-store, or an error in the API's shape: no page of another type,
// no caching headers, no 5xx body, no redirect, and nothing charged for
// an answer that is not one.
func TestUpstreamAnswersHaveTheAPIsShape(t *testing.T) {
	e := start(t, manyFailures, "retries 0", faultTier)
	key, _ := e.meteredKey(t)
	const secret = "postgres://admin:hunter2@db.internal:5432/prod"
	caching := http.Header{
		"Cache-Control": {"public, max-age=31536000"}, "Vary": {"*"}, "Expires": {"Thu, 01 Dec 2099 16:00:00 GMT"},
		"Etag": {`"abc"`}, "Last-Modified": {"Wed, 21 Oct 2015 07:28:00 GMT"}, "Set-Cookie": {"session=1; Path=/"},
		"Age": {"100"},
	}
	for _, tc := range []struct {
		name     string
		behavior standin.Behavior
		body     string
		status   int
		code     string // "" for the upstream's own answer, passed on
		streamed int64
	}{
		{"200 as text/html", standin.Behavior{ContentType: "text/html"}, faultChat, 502, "upstream_bad_response", 0},
		{"a stream as text/html", standin.Behavior{ContentType: "text/html; charset=utf-8"}, faultStream, 502, "upstream_bad_response", 0},
		{"a stream as application/json", standin.Behavior{ContentType: "application/json"}, faultStream, 502, "upstream_bad_response", 0},
		{"caching headers", standin.Behavior{Headers: caching}, faultChat, 200, "", 10},
		{"caching headers on a stream", standin.Behavior{Headers: caching}, faultStream, 200, "", 10},
		{"500 with an HTML page", standin.Behavior{FailStatus: 500, ContentType: "text/html", FailBody: "<html><body>OperationalError: " + secret + "</body></html>"}, faultChat, 500, "upstream_error", 0},
		{"500 in the API's shape", standin.Behavior{FailStatus: 500, FailBody: `{"error":{"message":"` + secret + `","type":"server_error","code":"server_error"}}`}, faultChat, 500, "upstream_error", 0},
		{"520 of a CDN", standin.Behavior{FailStatus: 520, ContentType: "text/html", FailBody: "<html>" + secret + "</html>"}, faultChat, 502, "upstream_error", 0},
		{"404 as text/html", standin.Behavior{FailStatus: 404, ContentType: "text/html", FailBody: "<html>" + secret + "</html>"}, faultChat, 404, "upstream_error", 0},
		{"400 as JSON not in the API's shape", standin.Behavior{FailStatus: 400, FailBody: `{"detail":"` + secret + `"}`}, faultChat, 400, "upstream_error", 0},
		{"400 in the API's shape", standin.Behavior{FailStatus: 400, Headers: caching}, faultChat, 400, "", 0},
		{"302", standin.Behavior{Redirect: "http://evil.example/steal"}, faultChat, 502, "upstream_bad_response", 0},
		{"302 for a stream", standin.Behavior{Redirect: "http://evil.example/steal"}, faultStream, 502, "upstream_bad_response", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := e.usage(t, key)
			e.upstream.SetBehavior(tc.behavior)
			calls := e.upstream.Count()
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(tc.body),
				http.Header{"Authorization": {"Bearer " + key}})
			wantAPIHeaders(t, res)
			switch {
			case tc.code != "":
				apiErr := wantAPIError(t, res, tc.status, tc.code)
				if strings.Contains(apiErr.Error.Message, "hunter2") {
					t.Errorf("the upstream's body reached the caller: %q", apiErr.Error.Message)
				}
			case tc.status != 200:
				body, _ := io.ReadAll(res.Body)
				if res.StatusCode != tc.status || !strings.Contains(string(body), `"code":"injected_failure"`) {
					t.Errorf("got %d %s, want the upstream's own %d", res.StatusCode, body, tc.status)
				}
			default:
				body, _ := io.ReadAll(res.Body)
				if res.StatusCode != 200 {
					t.Errorf("got %d %s, want 200", res.StatusCode, body)
				}
			}
			if got := e.upstream.Count() - calls; got != 1 {
				t.Errorf("%d upstream requests, want 1 (a redirect is never followed)", got)
			}
			e.upstream.SetBehavior(standin.Behavior{})
			if tc.streamed == 0 {
				wantSettled(t, e, key, before, 0)
			}
		})
	}

	t.Run("the models cache keeps its own caching", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{Headers: caching})
		defer e.upstream.SetBehavior(standin.Behavior{})
		res := e.do(t, http.MethodGet, "/v1/models", nil, nil)
		io.Copy(io.Discard, res.Body)
		if res.StatusCode != 200 || res.Header.Get("X-Content-Type-Options") != "nosniff" ||
			!strings.HasPrefix(res.Header.Get("Cache-Control"), "private, max-age=") || res.Header.Get("Vary") != "" {
			t.Errorf("models: %d, headers %v", res.StatusCode, res.Header)
		}
	})
	t.Run("the proxy's own errors", func(t *testing.T) {
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(faultChat),
			http.Header{"Authorization": {"Bearer vgt_nonsense"}})
		wantAPIHeaders(t, res)
		wantAPIError(t, res, 401, "invalid_api_key")
	})
}

// TestStreamWithCROnlyLinesIsRead: server-sent events whose lines end with
// CR alone, or CRLF, as the format allows, reach an SDK client whole, and
// their usage is charged.
func TestStreamWithCROnlyLinesIsRead(t *testing.T) {
	e := start(t)
	for _, end := range []string{"\r", "\r\n"} {
		t.Run(strings.NewReplacer("\r", "CR", "\n", "LF").Replace(end), func(t *testing.T) {
			e.upstream.SetBehavior(standin.Behavior{LineEnd: end})
			before, _ := e.usage(t, e.key)
			params := chatParams("hello there")
			params.MaxTokens = openai.Int(12)
			stream := e.client.Chat.Completions.NewStreaming(t.Context(), params)
			var text strings.Builder
			for stream.Next() {
				for _, c := range stream.Current().Choices {
					text.WriteString(c.Delta.Content)
				}
			}
			if err := stream.Err(); err != nil {
				t.Fatalf("stream: %v (got %q)", err, text.String())
			}
			if want := standin.Answer(12); text.String() != want {
				t.Errorf("content %q, want %q", text.String(), want)
			}
			u := waitUsage(t, e, e.key, before, 12)
			t.Logf("charged %d completion tokens", u)
		})
	}
}

// waitUsage waits until the key's completion tokens today grew by want
// since before, and returns the growth.
func waitUsage(t *testing.T, e *env, key string, before usageAnswer, want int64) int64 {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		u, _ := e.usage(t, key)
		got := u.Today.CompletionTokens - before.Today.CompletionTokens
		if got == want {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("charged %d completion tokens, want %d", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// heapAfterGC is the live heap of this process, where Caddy runs.
func heapAfterGC() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestAnswersHoldBoundedMemory: what answers hold in memory is bounded
// over the process, as request bodies are by max_buffered. Many streams
// whose upstream sends an event of most of a MiB without its blank line,
// then stalls, and many JSON answers of a MiB that stall before their
// end, hold at most max_buffered between them: the streams past it are
// ended with upstream_stream_failed, the answers past it passed on as
// they come. An event over the bound of one event ends its stream.
func TestAnswersHoldBoundedMemory(t *testing.T) {
	const (
		calls  = 40
		bound  = 8 << 20 // max_buffered
		eventB = 1<<20 - 4<<10
		within = bound/eventB + 2 // answers the bound may hold, and room
		// firstBuffers is the most an answer's first buffer holds,
		// counted but never refused.
		firstBuffers = 64 << 10
	)
	// Calls whose callers left end a second later: the upstream here
	// stalls for good.
	e := start(t, manyFailures, "max_body 1MiB", "max_buffered 8MiB", "detached 256 timeout 1s")
	base := heapAfterGC()

	t.Run("streams", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{LongEvent: eventB, LongEventOpen: true})
		var ended atomic.Int64
		stop := callMany(t, e, faultStream, calls, func(res *http.Response) {
			if b, _ := io.ReadAll(res.Body); strings.Contains(string(b), "upstream_stream_failed") {
				ended.Add(1)
			}
		})
		defer stop()
		// Streams past the bound end; those within it hold their event.
		waitFor(t, 20*time.Second, fmt.Sprintf("at least %d of %d streams ended with upstream_stream_failed, the rest held in memory", calls-within, calls),
			func() bool { return ended.Load() >= calls-within })
		held := heapAfterGC()
		counted := metricValue(t, e, "vigthoria_answer_buffered_bytes")
		t.Logf("live heap: %d MiB before, %d MiB with %d streams held open (%d ended); answers hold %.1f MiB",
			base>>20, held>>20, calls-ended.Load(), ended.Load(), counted/(1<<20))
		if counted > bound+calls*firstBuffers || counted < bound/2 {
			t.Errorf("vigthoria_answer_buffered_bytes = %v, want the streams held open, at most max_buffered (%d) and first buffers", counted, bound)
		}
		if held > base+bound+calls*(128<<10)+(8<<20) {
			t.Errorf("live heap grew by %d MiB, want at most max_buffered (%d MiB) and small buffers", (held-base)>>20, bound>>20)
		}
	})

	t.Run("JSON answers", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{Padding: eventB, StallMidBody: 1})
		var headers atomic.Int64
		stop := callMany(t, e, faultChat, calls, func(res *http.Response) {
			headers.Add(1)
			io.Copy(io.Discard, res.Body)
		})
		defer stop()
		// Answers past the bound are passed on as they come: their
		// callers get the headers while the answer stalls.
		waitFor(t, 20*time.Second, fmt.Sprintf("at least %d of %d stalled answers reached their callers, the rest held in memory", calls-within, calls),
			func() bool { return headers.Load() >= calls-within })
		held := heapAfterGC()
		counted := metricValue(t, e, "vigthoria_answer_buffered_bytes")
		t.Logf("live heap: %d MiB before, %d MiB with %d JSON answers stalled; answers hold %.1f MiB", base>>20, held>>20, calls, counted/(1<<20))
		if counted > bound+2*calls*firstBuffers {
			t.Errorf("vigthoria_answer_buffered_bytes = %v, over max_buffered (%d) and first buffers", counted, bound)
		}
		if held > base+bound+calls*(128<<10)+(8<<20) {
			t.Errorf("live heap grew by %d MiB, want at most max_buffered (%d MiB) and small buffers", (held-base)>>20, bound>>20)
		}
	})

	t.Run("an event over a MiB", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{LongEvent: 2 << 20})
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(faultStream), nil)
		wantErrorEvent(t, res, "upstream_stream_failed")
	})
	e.upstream.SetBehavior(standin.Behavior{})
	deadline := time.Now().Add(10 * time.Second)
	for wire.Held() != 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	after := heapAfterGC()
	t.Logf("live heap: %d MiB before, %d MiB after; answers hold %d bytes", base>>20, after>>20, wire.Held())
	if wire.Held() != 0 {
		t.Errorf("answers hold %d bytes once every call ended, want 0", wire.Held())
	}
	if after > base+(8<<20) {
		t.Errorf("live heap after: %d MiB, before %d MiB: answers' buffers are kept", after>>20, base>>20)
	}
}

// TestStreamUsageSurvivesSIGKILL: a stream's usage is in the ledger as it
// goes, so that an instance killed in the middle of it has recorded all
// but about its last second.
func TestStreamUsageSurvivesSIGKILL(t *testing.T) {
	up := standin.New(standin.Options{APIKey: serverKey})
	up.SetBehavior(standin.Behavior{ChunkDelay: 50 * time.Millisecond})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	path := filepath.Join(t.TempDir(), "keys.db")
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	rec, secret, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "streamer", Tier: "pro"}, time.Now())
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	c := harness.StartProcess(t, vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store sqlite "+path, "tier pro"))

	// 100 tokens, 50 ms apart: a stream of 5 s, killed at 3 s.
	body := `{"model":"vigthoria-fast-1","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi"}]}`
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, c.URL+"/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+secret)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("status %d", res.StatusCode)
	}
	var got []time.Time // when each content chunk came
	lines := bufio.NewScanner(res.Body)
	began := time.Now()
	for lines.Scan() && time.Since(began) < 3*time.Second {
		if strings.Contains(lines.Text(), `"content":"`) {
			got = append(got, time.Now())
		}
	}
	if err := syscall.Kill(c.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	// What the client got up to 1.5 s before the kill: a flush a second,
	// and room for a busy machine.
	var early int64
	for _, at := range got {
		if killed.Sub(at) >= 1500*time.Millisecond {
			early++
		}
	}
	time.Sleep(200 * time.Millisecond)

	st, err = sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rows, err := st.UsageSince(context.Background(), rec.ID, store.Day(time.Now().Add(-24*time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	var sum store.UsageRow
	for _, r := range rows {
		sum.Add(r)
	}
	t.Logf("killed after %d streamed chunks (%d of them 1.5 s before); the ledger holds %d requests, %d prompt and %d completion tokens",
		len(got), early, sum.Requests, sum.PromptTokens, sum.CompletionTokens)
	if sum.CompletionTokens < early || sum.CompletionTokens > int64(len(got))+10 {
		t.Errorf("the ledger holds %d completion tokens, want at least the %d streamed 1.5 s before the kill, and at most the %d streamed",
			sum.CompletionTokens, early, len(got))
	}
	if sum.Requests != 1 || sum.PromptTokens == 0 {
		t.Errorf("the ledger holds %d requests and %d prompt tokens, want the stream's one, with its prompt", sum.Requests, sum.PromptTokens)
	}
}

// TestRunningStreamIsCountedOnce: a stream's usage recorded as it goes
// adds up, with what its end records, to its charge exactly once.
func TestRunningStreamIsCountedOnce(t *testing.T) {
	e := start(t)
	e.upstream.SetBehavior(standin.Behavior{ChunkDelay: 50 * time.Millisecond})
	before, _ := e.usage(t, e.key)
	params := chatParams("count me once")
	params.MaxTokens = openai.Int(60)
	stream := e.client.Chat.Completions.NewStreaming(t.Context(), params)
	var mid usageAnswer
	n := 0
	for stream.Next() {
		if n++; n == 50 { // 2.5 s in: some of it is recorded
			mid, _ = e.usage(t, e.key)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if got := mid.Today.CompletionTokens - before.Today.CompletionTokens; got <= 0 || mid.Today.Requests-before.Today.Requests != 1 {
		t.Errorf("2.5 s into the stream the ledger holds %d completion tokens and %d requests of it, want some, and 1",
			got, mid.Today.Requests-before.Today.Requests)
	}
	waitUsage(t, e, e.key, before, 60)
	time.Sleep(1200 * time.Millisecond) // a flush: nothing more comes
	after, _ := e.usage(t, e.key)
	prompt, completion := e.upstream.Billed()
	if got := after.Today.CompletionTokens - before.Today.CompletionTokens; got != 60 {
		t.Errorf("charged %d completion tokens, want 60", got)
	}
	if got := after.Today.PromptTokens - before.Today.PromptTokens; got != prompt || completion != 60 {
		t.Errorf("charged %d prompt tokens, the upstream billed %d (and %d completion)", got, prompt, completion)
	}
	if got := after.Today.Requests - before.Today.Requests; got != 1 {
		t.Errorf("counted %d requests, want 1", got)
	}
}

// callMany sends n POSTs of body to the chat endpoint at once, each
// answer to onAnswer; stop cancels those still running and waits for
// them, and runs at the test's end too.
func callMany(t *testing.T, e *env, body string, n int64, onAnswer func(*http.Response)) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, e.caddy.URL+"/v1/chat/completions", strings.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+e.key)
			req.Header.Set("Content-Type", "application/json")
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				return
			}
			defer res.Body.Close()
			onAnswer(res)
		})
	}
	stop = func() { cancel(); wg.Wait() }
	t.Cleanup(stop)
	return stop
}
