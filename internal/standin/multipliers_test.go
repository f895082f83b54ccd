package standin

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func post(t *testing.T, s *Server, path, body string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/v1"+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer k")
	w := httptest.NewRecorder()
	s.ServeHTTP(w, req)
	return w
}

// TestBestOfIsBilled: best_of candidates are generated and billed, n
// returned, for each prompt.
func TestBestOfIsBilled(t *testing.T) {
	s := New(Options{APIKey: "k"})
	w := post(t, s, "/completions", `{"model":"vigthoria-fast-1","prompt":["a","b"],"max_tokens":3,"n":2,"best_of":5}`)
	var res struct {
		Choices []json.RawMessage
		Usage   struct {
			CompletionTokens int64 `json:"completion_tokens"`
		}
	}
	if err := json.Unmarshal(w.Body.Bytes(), &res); err != nil || w.Code != 200 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	if len(res.Choices) != 4 || res.Usage.CompletionTokens != 2*5*3 {
		t.Errorf("%d choices, %d completion tokens; want 4 and 30", len(res.Choices), res.Usage.CompletionTokens)
	}
	for _, body := range []string{
		`{"model":"vigthoria-fast-1","prompt":"a","n":3,"best_of":2}`,
		`{"model":"vigthoria-fast-1","prompt":"a","best_of":21}`,
		`{"model":"vigthoria-fast-1","prompt":"a","best_of":2,"stream":true}`,
	} {
		if w := post(t, s, "/completions", body); w.Code != 400 {
			t.Errorf("%s: %d, want 400", body, w.Code)
		}
	}
}

// TestDeltaKinds: a stream's chat deltas carry tool calls or reasoning
// when told to.
func TestDeltaKinds(t *testing.T) {
	s := New(Options{APIKey: "k"})
	for kind, want := range map[string]string{
		ToolCallDeltas:  `"delta":{"tool_calls":[{"index":0,"function":{"arguments":" is"}}]}`,
		ReasoningDeltas: `"delta":{"reasoning_content":" is"}`,
		ContentDeltas:   `"delta":{"content":" is"}`,
	} {
		s.SetBehavior(Behavior{Deltas: kind})
		w := post(t, s, "/chat/completions", `{"model":"vigthoria-fast-1","stream":true,"max_tokens":3,"messages":[{"role":"user","content":"hi"}]}`)
		if !strings.Contains(w.Body.String(), want) {
			t.Errorf("%q stream lacks %s:\n%s", kind, want, w.Body)
		}
		if kind == ToolCallDeltas && !strings.Contains(w.Body.String(), `"finish_reason":"tool_calls"`) {
			t.Errorf("a tool call stream does not finish with tool_calls:\n%s", w.Body)
		}
	}
}

// TestUsageDetails: a chat answer's usage carries OpenAI's details objects,
// with the cached prompt tokens and the reasoning tokens when there are
// any; Usage replaces it.
func TestUsageDetails(t *testing.T) {
	s := New(Options{APIKey: "k"})
	const stream = `{"model":"vigthoria-fast-1","stream":true,"stream_options":{"include_usage":true},"max_tokens":3,"messages":[{"role":"user","content":"one two three four five"}]}`
	for _, tc := range []struct {
		behavior Behavior
		body     string
		want     string
	}{
		{Behavior{}, `{"model":"vigthoria-fast-1","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}`,
			`"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},` +
				`"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}`},
		{Behavior{CachedTokens: 5, Deltas: ReasoningDeltas}, stream,
			`"usage":{"prompt_tokens":8,"completion_tokens":3,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":5,"audio_tokens":0},` +
				`"completion_tokens_details":{"reasoning_tokens":3,`},
		{Behavior{CachedTokens: 100}, stream, `"prompt_tokens_details":{"cached_tokens":8,`},
		{Behavior{}, `{"model":"vigthoria-fast-1","max_tokens":3,"prompt":"hi"}`, `"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}`},
		{Behavior{Usage: `{"prompt_tokens":-1}`}, stream, `"choices":[],"usage":{"prompt_tokens":-1}}`},
	} {
		s.SetBehavior(tc.behavior)
		path := "/chat/completions"
		if strings.Contains(tc.body, `"prompt"`) {
			path = "/completions"
		}
		if w := post(t, s, path, tc.body); !strings.Contains(w.Body.String(), tc.want) {
			t.Errorf("%+v: the answer lacks %s:\n%s", tc.behavior, tc.want, w.Body)
		}
	}
}
