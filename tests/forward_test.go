package tests

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

func TestChatCompletion(t *testing.T) {
	e := start(t)
	res, err := e.client.Chat.Completions.New(t.Context(), chatParams("Hello there"))
	if err != nil {
		t.Fatalf("chat: %v", err)
	}
	if len(res.Choices) != 1 || res.Choices[0].Message.Content == "" {
		t.Fatalf("choices = %+v, want one answer", res.Choices)
	}
	if res.Usage.TotalTokens == 0 || res.Usage.TotalTokens != res.Usage.PromptTokens+res.Usage.CompletionTokens {
		t.Errorf("usage = %+v, want consistent non-zero counts", res.Usage)
	}
	e.wantUpstreamCalls(t, 1)
	got := e.lastRequest(t)
	if got.Method != http.MethodPost || got.Path != "/v1/chat/completions" {
		t.Errorf("upstream got %s %s, want POST /v1/chat/completions", got.Method, got.Path)
	}
	if !strings.Contains(string(got.Body), "Hello there") {
		t.Errorf("upstream body %s lacks the prompt", got.Body)
	}
	e.wantNoClientSecrets(t, got)
}

func TestStreamingChatFlowsUnbuffered(t *testing.T) {
	e := start(t)
	const delay, tokens = 200 * time.Millisecond, 8
	e.upstream.SetBehavior(standin.Behavior{ChunkDelay: delay})

	params := chatParams("stream please")
	params.MaxTokens = openai.Int(tokens)
	stream := e.client.Chat.Completions.NewStreaming(t.Context(), params)
	var arrivals []time.Time
	var text strings.Builder
	for stream.Next() {
		arrivals = append(arrivals, time.Now())
		if ch := stream.Current().Choices; len(ch) > 0 {
			text.WriteString(ch[0].Delta.Content)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if len(arrivals) != tokens+2 { // role chunk, the tokens, finish chunk
		t.Fatalf("got %d chunks, want %d", len(arrivals), tokens+2)
	}
	if got := text.String(); got != standin.Answer(tokens) {
		t.Errorf("streamed text = %q, want %q", got, standin.Answer(tokens))
	}
	// The upstream spends tokens×delay on the stream. Passed on as sent,
	// the chunks spread over about that time; a buffering proxy would
	// deliver them together at the end. Half the spread leaves a wide
	// margin for a slow machine.
	if spread := arrivals[len(arrivals)-1].Sub(arrivals[0]); spread < tokens*delay/2 {
		t.Errorf("chunks arrived within %v, want them spread over about %v: the stream was buffered", spread, tokens*delay)
	}
	e.wantNoClientSecrets(t, e.lastRequest(t))
}

func TestCompletionsEmbeddingsModels(t *testing.T) {
	e := start(t)
	comp, err := e.client.Completions.New(t.Context(), openai.CompletionNewParams{
		Model:     openai.CompletionNewParamsModel(model),
		Prompt:    openai.CompletionNewParamsPromptUnion{OfString: openai.String("Say hi")},
		MaxTokens: openai.Int(3),
	})
	if err != nil {
		t.Fatalf("completions: %v", err)
	}
	if len(comp.Choices) != 1 || comp.Choices[0].Text == "" || comp.Usage.CompletionTokens != 3 {
		t.Errorf("completion = %+v, want one 3-token answer", comp)
	}

	emb, err := e.client.Embeddings.New(t.Context(), openai.EmbeddingNewParams{
		Model: "vigthoria-embed-1",
		Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"one", "two"}},
	})
	if err != nil {
		t.Fatalf("embeddings: %v", err)
	}
	if len(emb.Data) != 2 || len(emb.Data[0].Embedding) == 0 {
		t.Errorf("embeddings = %d vectors, want 2 non-empty", len(emb.Data))
	}

	page, err := e.client.Models.List(t.Context())
	if err != nil {
		t.Fatalf("models: %v", err)
	}
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
	}
	if !strings.Contains(strings.Join(ids, ","), model) {
		t.Errorf("models = %v, want %s among them", ids, model)
	}

	e.wantUpstreamCalls(t, 3)
	for _, r := range e.upstream.Requests() {
		e.wantNoClientSecrets(t, r)
	}
}

func TestUpstreamBasePathAndTLS(t *testing.T) {
	up := standin.New(standin.Options{APIKey: serverKey, BasePath: "/api/v2"})
	srv := httptest.NewTLSServer(up)
	t.Cleanup(srv.Close)
	e := startOn(t, up, srv, srv.URL+"/api/v2/", "{env.VIGTHORIA_TEST_KEY}")

	if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("over TLS")); err != nil {
		t.Fatalf("chat over an https upstream: %v", err)
	}
	got := e.lastRequest(t)
	if got.Path != "/api/v2/chat/completions" {
		t.Errorf("upstream path = %s, want /api/v2/chat/completions", got.Path)
	}
	if host := strings.TrimPrefix(srv.URL, "https://"); got.Host != host {
		t.Errorf("upstream Host = %s, want %s", got.Host, host)
	}
	e.wantNoClientSecrets(t, got)
}

func TestClientCredentialsNeverReachUpstream(t *testing.T) {
	e := start(t)
	h := http.Header{
		"Authorization":       {"Bearer " + e.key},
		"Cookie":              {"session=" + e.key},
		"X-Api-Key":           {e.key},
		"Api-Key":             {e.key},
		"X-Goog-Api-Key":      {e.key},
		"Proxy-Authorization": {"Basic " + e.key},
		"Openai-Organization": {"org-someone-else"},
		"Content-Type":        {"application/json"},
		"X-Custom-Trace":      {"dropped"},
		"X-Request-Id":        {"kept"},
	}
	res := e.do(t, http.MethodPost, "/v1/chat/completions?trace=1",
		jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}), h)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status = %d, want 200", res.StatusCode)
	}
	got := e.lastRequest(t)
	e.wantNoClientSecrets(t, got)
	for _, name := range []string{"Cookie", "X-Api-Key", "Api-Key", "X-Goog-Api-Key", "Proxy-Authorization", "Openai-Organization", "X-Forwarded-For"} {
		if v := got.Header.Get(name); v != "" {
			t.Errorf("upstream got %s: %q, want none", name, v)
		}
	}
	if got.RawQuery != "" {
		t.Errorf("upstream got query %q, want none", got.RawQuery)
	}
	// Request headers cross on an allowlist (see upstream_security_test.go).
	if got.Header.Get("X-Request-Id") != "kept" || got.Header.Get("X-Custom-Trace") != "" {
		t.Errorf("upstream X-Request-Id %q, X-Custom-Trace %q: want the allowed one only",
			got.Header.Get("X-Request-Id"), got.Header.Get("X-Custom-Trace"))
	}
}

func TestUnknownRoutesNeverReachUpstream(t *testing.T) {
	e := start(t)
	cases := []struct {
		name, method, path string
		status             int
		code               string
	}{
		{"unknown path", http.MethodGet, "/v1/files", http.StatusNotFound, "unknown_url"},
		{"root", http.MethodGet, "/", http.StatusNotFound, "unknown_url"},
		{"no v1 prefix", http.MethodPost, "/chat/completions", http.StatusNotFound, "unknown_url"},
		{"trailing slash", http.MethodGet, "/v1/models/", http.StatusNotFound, "unknown_url"},
		{"model by id", http.MethodGet, "/v1/models/vigthoria-fast-1", http.StatusNotFound, "unknown_url"},
		{"dot segments", http.MethodGet, "/v1/../v1/organization/usage", http.StatusNotFound, "unknown_url"},
		{"encoded slash", http.MethodPost, "/v1/chat%2Fcompletions", http.StatusNotFound, "unknown_url"},
		{"GET chat", http.MethodGet, "/v1/chat/completions", http.StatusMethodNotAllowed, "method_not_allowed"},
		{"DELETE models", http.MethodDelete, "/v1/models", http.StatusMethodNotAllowed, "method_not_allowed"},
		{"POST models", http.MethodPost, "/v1/models", http.StatusMethodNotAllowed, "method_not_allowed"},
		{"PUT embeddings", http.MethodPut, "/v1/embeddings", http.StatusMethodNotAllowed, "method_not_allowed"},
		{"HEAD usage", http.MethodHead, "/v1/usage", http.StatusMethodNotAllowed, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := e.do(t, tc.method, tc.path, nil, nil)
			if tc.method == http.MethodHead {
				if res.StatusCode != tc.status || res.Header.Get("Allow") != http.MethodGet {
					t.Errorf("HEAD: status %d Allow %q, want %d GET", res.StatusCode, res.Header.Get("Allow"), tc.status)
				}
				return
			}
			wantAPIError(t, res, tc.status, tc.code)
			if tc.status == http.StatusMethodNotAllowed && res.Header.Get("Allow") == "" {
				t.Error("405 without an Allow header")
			}
		})
	}
	e.wantUpstreamCalls(t, 0)
}

func TestBodyLimit(t *testing.T) {
	e := start(t, "max_body 1KB")
	big := `{"model":"` + model + `","messages":[{"role":"user","content":"` + strings.Repeat("x", 2000) + `"}]}`

	t.Run("content-length over the limit", func(t *testing.T) {
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(big), nil)
		wantAPIError(t, res, http.StatusRequestEntityTooLarge, "request_too_large")
	})
	t.Run("chunked body over the limit", func(t *testing.T) {
		// A reader without a length makes the client send it chunked, so
		// the limit can only be found while reading.
		res := e.do(t, http.MethodPost, "/v1/chat/completions", io.MultiReader(strings.NewReader(big)), nil)
		wantAPIError(t, res, http.StatusRequestEntityTooLarge, "request_too_large")
	})
	e.wantUpstreamCalls(t, 0)

	t.Run("at the limit passes, byte for byte", func(t *testing.T) {
		small := `{"model":"` + model + `","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}`
		res := e.do(t, http.MethodPost, "/v1/chat/completions", io.MultiReader(strings.NewReader(small)), nil)
		if res.StatusCode != http.StatusOK {
			t.Fatalf("status = %d, want 200", res.StatusCode)
		}
		if got := e.lastRequest(t); string(got.Body) != small {
			t.Errorf("upstream body = %s, want the client's bytes %s", got.Body, small)
		}
	})
}

func TestUpstreamErrorsAreTypedAndHeadersPass(t *testing.T) {
	e := start(t, "retries 0")
	chat := func() *http.Response {
		return e.do(t, http.MethodPost, "/v1/chat/completions",
			jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}), nil)
	}
	for _, tc := range []struct {
		name   string
		status int
	}{
		{"server error", http.StatusInternalServerError},
		{"unavailable", http.StatusServiceUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.upstream.SetBehavior(standin.Behavior{FailStatus: tc.status, FailCount: 1})
			_, err := e.client.Chat.Completions.New(t.Context(), chatParams("hi"))
			wantOpenAIError(t, err, tc.status, "upstream_error")
		})
	}

	t.Run("rate-limit headers pass unchanged", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{})
		res := chat()
		for _, name := range []string{"X-Ratelimit-Limit", "X-Ratelimit-Remaining", "X-Ratelimit-Reset"} {
			if res.Header.Get(name) == "" {
				t.Errorf("%s missing from the answer", name)
			}
		}
		// The upstream counts down per request: the proxy passes its own
		// figures, whatever they are, without rewriting them.
		before := res.Header.Get("X-Ratelimit-Remaining")
		res2 := chat()
		if after := res2.Header.Get("X-Ratelimit-Remaining"); after == before {
			t.Errorf("X-RateLimit-Remaining stayed %s across two upstream calls: not the upstream's value", after)
		}
	})

	t.Run("rate limited, then exhausted until the upstream's reset", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusTooManyRequests, FailCount: 1, RetryAfter: 7})
		_, err := e.client.Chat.Completions.New(t.Context(), chatParams("hi"))
		oe := wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded")
		if got := oe.Response.Header.Get("Retry-After"); got != "7" {
			t.Errorf("Retry-After = %q, want the upstream's 7", got)
		}
		// The upstream said the key is spent for 7s: callers are told so
		// locally, and the upstream is spared.
		calls := e.upstream.Count()
		res := chat()
		wantAPIError(t, res, http.StatusTooManyRequests, "upstream_rate_limited")
		if ra := atoi(t, res.Header.Get("Retry-After")); ra < 6 || ra > 7 {
			t.Errorf("local Retry-After = %d, want what is left of the upstream's 7s", ra)
		}
		if e.upstream.Count() != calls {
			t.Error("the upstream was called while it said it was exhausted")
		}
	})
}

func TestBadServerKeyIsA502WithoutUpstreamBody(t *testing.T) {
	up := standin.New(standin.Options{APIKey: "the-real-key"})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := startOn(t, up, srv, srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}")

	res := e.do(t, http.MethodPost, "/v1/chat/completions",
		jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}), nil)
	body := wantAPIError(t, res, http.StatusBadGateway, "upstream_auth_failed")
	if strings.Contains(body.Error.Message, "key") && strings.Contains(body.Error.Message, serverKey[:8]) {
		t.Errorf("message %q names the key", body.Error.Message)
	}
	if strings.Contains(strings.ToLower(body.Error.Message), "incorrect api key") {
		t.Errorf("message %q carries the upstream's body", body.Error.Message)
	}
	_, err := e.client.Chat.Completions.New(t.Context(), chatParams("hi"))
	wantOpenAIError(t, err, http.StatusBadGateway, "upstream_auth_failed")
}

func TestUpstreamUnreachableAndTimeout(t *testing.T) {
	t.Run("refused connection is 502", func(t *testing.T) {
		closedPort := harness.FreePort(t)
		e := startOn(t, standin.New(standin.Options{APIKey: serverKey}), nil,
			"http://127.0.0.1:"+strconv.Itoa(closedPort)+"/v1", "{env.VIGTHORIA_TEST_KEY}")
		_, err := e.client.Chat.Completions.New(t.Context(), chatParams("hi"))
		wantOpenAIError(t, err, http.StatusBadGateway, "upstream_unavailable")
	})
	t.Run("late headers are 504", func(t *testing.T) {
		// Late, not stalled: the call goes on past the 504 (see
		// TestHeaderTimeoutChargesWhatTheUpstreamBills), and one stalled
		// for good would hold Caddy's stop for its grace.
		e := start(t, "header_timeout 300ms")
		e.upstream.SetBehavior(standin.Behavior{Latency: time.Second})
		_, err := e.client.Chat.Completions.New(t.Context(), chatParams("hi"))
		wantOpenAIError(t, err, http.StatusGatewayTimeout, "upstream_timeout")
	})
}

func TestMidStreamFailureEndsWithErrorEvent(t *testing.T) {
	e := start(t)
	e.upstream.SetBehavior(standin.Behavior{FailMidStream: 3})

	t.Run("raw stream", func(t *testing.T) {
		res := e.do(t, http.MethodPost, "/v1/chat/completions", jsonBody(map[string]any{
			"model": model, "stream": true, "max_tokens": 10,
			"messages": []map[string]string{{"role": "user", "content": "hi"}},
		}), nil)
		raw, err := io.ReadAll(res.Body)
		if err != nil {
			t.Fatalf("the proxy did not end the stream cleanly: %v (got %q)", err, raw)
		}
		events := strings.Split(strings.TrimSuffix(string(raw), "\n\n"), "\n\n")
		for i, ev := range events {
			if !strings.HasPrefix(ev, "data: {") || strings.Count(ev, "\n") != 0 {
				t.Errorf("event %d is torn or malformed: %q", i, ev)
			}
		}
		last := events[len(events)-1]
		if !strings.Contains(last, `"error":{`) || !strings.Contains(last, "upstream_stream_failed") {
			t.Errorf("last event = %q, want an error event", last)
		}
		if strings.Contains(string(raw), "[DONE]") {
			t.Error("a broken stream must not claim [DONE]")
		}
	})
	t.Run("client library sees an error", func(t *testing.T) {
		stream := e.client.Chat.Completions.NewStreaming(t.Context(), chatParams("hi"))
		chunks := 0
		for stream.Next() {
			chunks++
		}
		if stream.Err() == nil {
			t.Fatalf("stream ended without error after %d chunks", chunks)
		}
		if !strings.Contains(stream.Err().Error(), "upstream") {
			t.Errorf("error = %v, want the proxy's message", stream.Err())
		}
	})
}

func TestServerKey(t *testing.T) {
	t.Run("empty key refuses to start", func(t *testing.T) {
		c := harness.StartCaddy(t, "\trespond ok")
		t.Setenv("VIGTHORIA_UNSET_KEY", "")
		err := c.Load(vigthoriaBlock("http://127.0.0.1:1/v1", "{env.VIGTHORIA_UNSET_KEY}"))
		if err == nil || !strings.Contains(err.Error(), "api_key resolves to an empty value") {
			t.Fatalf("load error = %v, want the empty api_key error", err)
		}
	})
	t.Run("literal key warns and is used", func(t *testing.T) {
		up := standin.New(standin.Options{APIKey: serverKey})
		srv := httptest.NewServer(up)
		t.Cleanup(srv.Close)
		e := startOn(t, up, srv, srv.URL+"/v1", serverKey)
		if res := e.do(t, http.MethodGet, "/v1/models", nil, nil); res.StatusCode != http.StatusOK {
			t.Errorf("status = %d, want 200 with the literal key", res.StatusCode)
		}
		if log := e.caddy.ReadLog(t); !strings.Contains(log, "api_key is a literal") {
			t.Error("no warning about the literal api_key in the log")
		}
	})
	t.Run("the placeholder, not the key, is in the config", func(t *testing.T) {
		e := start(t)
		res, err := http.Get(e.caddy.AdminURL + "/config/")
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		cfg, _ := io.ReadAll(res.Body)
		if !strings.Contains(string(cfg), "{env.VIGTHORIA_TEST_KEY}") || strings.Contains(string(cfg), serverKey) {
			t.Errorf("config = %s, want the placeholder and not the key", cfg)
		}
		if log := e.caddy.ReadLog(t); strings.Contains(log, serverKey) {
			t.Error("the server key is in Caddy's log")
		}
	})
}
