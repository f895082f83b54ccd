package standin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

const testKey = "sk-standin-test"

// newTest starts a stand-in and returns it with an official client for it.
func newTest(t *testing.T, opts Options) (*Server, *httptest.Server, openai.Client) {
	t.Helper()
	if opts.APIKey == "" {
		opts.APIKey = testKey
	}
	s := New(opts)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv, newClient(srv, testKey)
}

func newClient(srv *httptest.Server, key string) openai.Client {
	return openai.NewClient(
		option.WithBaseURL(srv.URL+"/v1/"),
		option.WithAPIKey(key),
		option.WithMaxRetries(0),
	)
}

// do sends a raw request and returns the response with its whole body.
func do(t *testing.T, srv *httptest.Server, method, path, key, body string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, b
}

// apiError asserts err is an *openai.Error with the given status and code.
func apiError(t *testing.T, err error, status int, code string) *openai.Error {
	t.Helper()
	var aerr *openai.Error
	if !errors.As(err, &aerr) {
		t.Fatalf("error = %v, want *openai.Error", err)
	}
	if aerr.StatusCode != status || aerr.Code != code {
		t.Fatalf("error status %d code %q, want %d %q", aerr.StatusCode, aerr.Code, status, code)
	}
	return aerr
}

func checkCommonHeaders(t *testing.T, h http.Header) {
	t.Helper()
	if !strings.HasPrefix(h.Get("X-Request-Id"), "req_") {
		t.Errorf("X-Request-Id = %q", h.Get("X-Request-Id"))
	}
	if got := h.Get("X-RateLimit-Limit"); got != strconv.Itoa(RateLimit) {
		t.Errorf("X-RateLimit-Limit = %q", got)
	}
	if n, err := strconv.Atoi(h.Get("X-RateLimit-Remaining")); err != nil || n < 0 || n >= RateLimit {
		t.Errorf("X-RateLimit-Remaining = %q", h.Get("X-RateLimit-Remaining"))
	}
	reset, err := strconv.ParseInt(h.Get("X-RateLimit-Reset"), 10, 64)
	if now := time.Now().Unix(); err != nil || reset%60 != 0 || reset < now || reset > now+61 {
		t.Errorf("X-RateLimit-Reset = %q", h.Get("X-RateLimit-Reset"))
	}
}

func TestAnswer(t *testing.T) {
	if got, want := Answer(5), "This is the Vigthoria stand-in"; got != want {
		t.Errorf("Answer(5) = %q, want %q", got, want)
	}
	if got := Answer(14); !strings.HasSuffix(got, "deterministic reply. This is") {
		t.Errorf("Answer(14) = %q, want the sentence repeated", got)
	}
	if got := len(strings.Fields(Answer(100))); got != 100 {
		t.Errorf("Answer(100) has %d words", got)
	}
}

func TestChatCompletion(t *testing.T) {
	_, _, client := newTest(t, Options{})
	tests := []struct {
		name       string
		params     openai.ChatCompletionNewParams
		wantTokens int
		wantFinish string
		wantChoice int
		wantPrompt int64
	}{{
		name: "default length stops",
		params: openai.ChatCompletionNewParams{
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hello there")},
		},
		wantTokens: DefaultMaxTokens, wantFinish: "stop", wantChoice: 1, wantPrompt: 2 + 3,
	}, {
		name: "max_tokens truncates",
		params: openai.ChatCompletionNewParams{
			Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
			MaxTokens: openai.Int(5),
		},
		wantTokens: 5, wantFinish: "length", wantChoice: 1, wantPrompt: 1 + 3,
	}, {
		name: "max_completion_tokens repeats the sentence",
		params: openai.ChatCompletionNewParams{
			Messages:            []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
			MaxCompletionTokens: openai.Int(30),
		},
		wantTokens: 30, wantFinish: "length", wantChoice: 1, wantPrompt: 1 + 3,
	}, {
		name: "n choices",
		params: openai.ChatCompletionNewParams{
			Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
			MaxTokens: openai.Int(2),
			N:         openai.Int(3),
		},
		wantTokens: 2, wantFinish: "length", wantChoice: 3, wantPrompt: 1 + 3,
	}, {
		name: "content parts and several messages",
		params: openai.ChatCompletionNewParams{
			Messages: []openai.ChatCompletionMessageParamUnion{
				openai.SystemMessage("be brief"),
				openai.UserMessage([]openai.ChatCompletionContentPartUnionParam{
					openai.TextContentPart("one two"), openai.TextContentPart("three"),
				}),
			},
		},
		wantTokens: DefaultMaxTokens, wantFinish: "stop", wantChoice: 1, wantPrompt: 2 + 3 + 3 + 3,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.params.Model = "vigthoria-fast-1"
			before := time.Now().Unix()
			res, err := client.Chat.Completions.New(t.Context(), tt.params)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(res.ID, "chatcmpl-") || res.Object != "chat.completion" || res.Model != "vigthoria-fast-1" {
				t.Errorf("id %q object %q model %q", res.ID, res.Object, res.Model)
			}
			if res.Created < before || res.Created > time.Now().Unix() {
				t.Errorf("created = %d", res.Created)
			}
			if len(res.Choices) != tt.wantChoice {
				t.Fatalf("%d choices, want %d", len(res.Choices), tt.wantChoice)
			}
			for i, c := range res.Choices {
				if c.Index != int64(i) || c.Message.Role != "assistant" || c.Message.Content != Answer(tt.wantTokens) || c.FinishReason != tt.wantFinish {
					t.Errorf("choice %d = index %d role %q content %q finish %q", i, c.Index, c.Message.Role, c.Message.Content, c.FinishReason)
				}
			}
			wantCompletion := int64(tt.wantTokens * tt.wantChoice)
			if u := res.Usage; u.PromptTokens != tt.wantPrompt || u.CompletionTokens != wantCompletion || u.TotalTokens != tt.wantPrompt+wantCompletion {
				t.Errorf("usage = %d/%d/%d, want %d/%d/%d", u.PromptTokens, u.CompletionTokens, u.TotalTokens,
					tt.wantPrompt, wantCompletion, tt.wantPrompt+wantCompletion)
			}
		})
	}
}

func TestChatStream(t *testing.T) {
	_, _, client := newTest(t, Options{})
	tests := []struct {
		name         string
		n            int64
		includeUsage bool
	}{
		{name: "without usage", n: 1},
		{name: "with usage", n: 1, includeUsage: true},
		{name: "n choices with usage", n: 2, includeUsage: true},
	}
	const tokens = 4
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			params := openai.ChatCompletionNewParams{
				Model:     "vigthoria-pro-1",
				Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("stream please")},
				MaxTokens: openai.Int(tokens),
				N:         openai.Int(tt.n),
			}
			if tt.includeUsage {
				params.StreamOptions.IncludeUsage = openai.Bool(true)
			}
			stream := client.Chat.Completions.NewStreaming(t.Context(), params)
			defer stream.Close()

			var chunks, usageChunks int
			content := make([]string, tt.n)
			finish := make([]string, tt.n)
			roles := 0
			for stream.Next() {
				c := stream.Current()
				chunks++
				if c.Object != "chat.completion.chunk" || !strings.HasPrefix(c.ID, "chatcmpl-") {
					t.Errorf("chunk %d: object %q id %q", chunks, c.Object, c.ID)
				}
				if len(c.Choices) == 0 {
					usageChunks++
					if c.Usage.CompletionTokens != tokens*tt.n || c.Usage.PromptTokens != 2+3 {
						t.Errorf("usage chunk = %+v", c.Usage)
					}
					continue
				}
				if wantRaw := map[bool]string{true: "null", false: ""}[tt.includeUsage]; c.JSON.Usage.Raw() != wantRaw {
					t.Errorf("chunk %d: usage raw %q, want %q", chunks, c.JSON.Usage.Raw(), wantRaw)
				}
				ch := c.Choices[0]
				if ch.Delta.Role == "assistant" {
					roles++
				}
				content[ch.Index] += ch.Delta.Content
				if ch.FinishReason != "" {
					finish[ch.Index] = ch.FinishReason
				}
			}
			if err := stream.Err(); err != nil {
				t.Fatalf("stream ended with %v", err)
			}
			wantUsage := 0
			if tt.includeUsage {
				wantUsage = 1
			}
			// A role chunk, the tokens and a finish chunk per choice, then usage.
			if want := int(tt.n)*(1+tokens+1) + wantUsage; chunks != want {
				t.Errorf("%d chunks, want %d", chunks, want)
			}
			if usageChunks != wantUsage || roles != int(tt.n) {
				t.Errorf("%d usage chunks, %d role chunks", usageChunks, roles)
			}
			for i := range tt.n {
				if content[i] != Answer(tokens) || finish[i] != "length" {
					t.Errorf("choice %d: content %q finish %q", i, content[i], finish[i])
				}
			}
		})
	}
}

func TestStreamWire(t *testing.T) {
	_, srv, _ := newTest(t, Options{})
	for _, includeUsage := range []bool{false, true} {
		t.Run("include_usage="+strconv.FormatBool(includeUsage), func(t *testing.T) {
			body := `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true`
			if includeUsage {
				body += `,"stream_options":{"include_usage":true}`
			}
			res, b := do(t, srv, http.MethodPost, "/v1/chat/completions", testKey, body+"}")
			if res.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", res.StatusCode, b)
			}
			if ct, cc := res.Header.Get("Content-Type"), res.Header.Get("Cache-Control"); ct != "text/event-stream" || cc != "no-cache" {
				t.Errorf("Content-Type %q, Cache-Control %q", ct, cc)
			}
			checkCommonHeaders(t, res.Header)

			events := strings.Split(strings.TrimSuffix(string(b), "\n\n"), "\n\n")
			if events[len(events)-1] != "data: [DONE]" || !strings.HasSuffix(string(b), "\n\n") {
				t.Fatalf("stream does not end with [DONE]: %q", b)
			}
			events = events[:len(events)-1]
			for i, ev := range events {
				data, ok := strings.CutPrefix(ev, "data: ")
				if !ok || !json.Valid([]byte(data)) {
					t.Fatalf("event %d is not a JSON data event: %q", i, ev)
				}
				last := i == len(events)-1
				switch {
				case !includeUsage && strings.Contains(data, `"usage"`):
					t.Errorf("event %d has usage though not asked: %s", i, data)
				case includeUsage && !last && !strings.Contains(data, `"usage":null`):
					t.Errorf("event %d lacks usage:null: %s", i, data)
				case includeUsage && last && !strings.Contains(data, `"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6,"prompt_tokens_details":{"cached_tokens":0,`):
					t.Errorf("last event is not the usage chunk: %s", data)
				}
			}
			if !strings.Contains(events[0], `"delta":{"role":"assistant","content":""}`) {
				t.Errorf("first event = %s", events[0])
			}
		})
	}
}

func TestCompletions(t *testing.T) {
	_, _, client := newTest(t, Options{})
	t.Run("whole", func(t *testing.T) {
		res, err := client.Completions.New(t.Context(), openai.CompletionNewParams{
			Model:     "vigthoria-fast-1",
			Prompt:    openai.CompletionNewParamsPromptUnion{OfArrayOfStrings: []string{"say something", "nice please now"}},
			MaxTokens: openai.Int(3),
			N:         openai.Int(2),
		})
		if err != nil {
			t.Fatal(err)
		}
		if res.Object != "text_completion" || !strings.HasPrefix(res.ID, "cmpl-") || len(res.Choices) != 4 {
			t.Fatalf("object %q id %q with %d choices", res.Object, res.ID, len(res.Choices))
		}
		for i, c := range res.Choices {
			if c.Index != int64(i) || c.Text != Answer(3) || c.FinishReason != "length" {
				t.Errorf("choice %d = %d %q %q", i, c.Index, c.Text, c.FinishReason)
			}
		}
		if u := res.Usage; u.PromptTokens != 5 || u.CompletionTokens != 12 || u.TotalTokens != 17 {
			t.Errorf("usage = %+v", u)
		}
	})
	t.Run("stream", func(t *testing.T) {
		stream := client.Completions.NewStreaming(t.Context(), openai.CompletionNewParams{
			Model:         "vigthoria-fast-1",
			Prompt:        openai.CompletionNewParamsPromptUnion{OfString: openai.String("tell me")},
			StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
		})
		defer stream.Close()
		var text, finish string
		var chunks int
		var usage openai.CompletionUsage
		for stream.Next() {
			c := stream.Current()
			chunks++
			if c.Object != "text_completion" {
				t.Errorf("object %q", c.Object)
			}
			if len(c.Choices) == 0 {
				usage = c.Usage
				continue
			}
			text += c.Choices[0].Text
			if c.Choices[0].FinishReason != "" {
				finish = string(c.Choices[0].FinishReason)
			}
		}
		if err := stream.Err(); err != nil {
			t.Fatal(err)
		}
		if text != Answer(DefaultMaxTokens) || finish != "stop" || chunks != DefaultMaxTokens+2 {
			t.Errorf("text %q finish %q in %d chunks", text, finish, chunks)
		}
		if usage.PromptTokens != 2 || usage.CompletionTokens != DefaultMaxTokens {
			t.Errorf("usage = %+v", usage)
		}
	})
}

func TestEmbeddings(t *testing.T) {
	_, _, client := newTest(t, Options{})
	embed := func(t *testing.T, input openai.EmbeddingNewParamsInputUnion, format openai.EmbeddingNewParamsEncodingFormat) *openai.CreateEmbeddingResponse {
		t.Helper()
		res, err := client.Embeddings.New(t.Context(), openai.EmbeddingNewParams{
			Model: "vigthoria-embed-1", Input: input, EncodingFormat: format,
		})
		if err != nil {
			t.Fatal(err)
		}
		if res.Object != "list" || res.Model != "vigthoria-embed-1" {
			t.Errorf("object %q model %q", res.Object, res.Model)
		}
		for i, d := range res.Data {
			var norm float64
			for _, f := range d.Embedding {
				norm += f * f
			}
			if d.Index != int64(i) || d.Object != "embedding" || len(d.Embedding) != 8 || math.Abs(norm-1) > 1e-5 {
				t.Errorf("data %d: index %d object %q %d dims, norm² %v", i, d.Index, d.Object, len(d.Embedding), norm)
			}
		}
		return res
	}
	// float32 is what is served; compare at that precision, since the
	// decimal and base64 forms widen to float64 differently.
	f32 := func(v []float64) []float32 {
		out := make([]float32, len(v))
		for i, f := range v {
			out[i] = float32(f)
		}
		return out
	}

	one := embed(t, openai.EmbeddingNewParamsInputUnion{OfString: openai.String("the quick fox")}, "")
	if one.Usage.PromptTokens != 3 || one.Usage.TotalTokens != 3 || len(one.Data) != 1 {
		t.Errorf("usage %+v with %d vectors", one.Usage, len(one.Data))
	}
	two := embed(t, openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"other text", "the quick fox"}},
		openai.EmbeddingNewParamsEncodingFormatBase64)
	if len(two.Data) != 2 || two.Usage.PromptTokens != 5 {
		t.Fatalf("%d vectors, usage %+v", len(two.Data), two.Usage)
	}
	if !slices.Equal(f32(one.Data[0].Embedding), f32(two.Data[1].Embedding)) {
		t.Errorf("same input, different vectors: %v (float) vs %v (base64)", one.Data[0].Embedding, two.Data[1].Embedding)
	}
	if slices.Equal(f32(two.Data[0].Embedding), f32(two.Data[1].Embedding)) {
		t.Error("different inputs, same vector")
	}
	tokens := embed(t, openai.EmbeddingNewParamsInputUnion{OfArrayOfTokens: []int64{1, 2, 3, 4}}, "float")
	if tokens.Usage.PromptTokens != 4 {
		t.Errorf("token input usage = %+v", tokens.Usage)
	}
}

func TestInputForms(t *testing.T) {
	_, srv, _ := newTest(t, Options{})
	tests := []struct {
		name, input          string
		wantVectors, wantTok int
	}{
		{"string", `"  three short  words "`, 1, 3},
		{"strings", `[ "a b" ,"c"]`, 2, 3},
		{"token IDs", `[ 5, 6, 7 ]`, 1, 3},
		{"token ID arrays", `[[1,2], [3]]`, 2, 3},
		{"mixed", `["one two", [1, 2, 3]]`, 2, 5},
		{"unicode spaces", `"a\u00a0b\u2003c"`, 1, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, b := do(t, srv, http.MethodPost, "/v1/embeddings", testKey, `{"model":"vigthoria-embed-1","input":`+tt.input+`}`)
			var e struct {
				Data  []json.RawMessage
				Usage struct {
					PromptTokens int `json:"prompt_tokens"`
				}
			}
			if err := json.Unmarshal(b, &e); err != nil || res.StatusCode != http.StatusOK {
				t.Fatalf("status %d body %s: %v", res.StatusCode, b, err)
			}
			if len(e.Data) != tt.wantVectors || e.Usage.PromptTokens != tt.wantTok {
				t.Errorf("%d vectors, %d tokens; want %d, %d", len(e.Data), e.Usage.PromptTokens, tt.wantVectors, tt.wantTok)
			}
		})
	}
}

func TestModels(t *testing.T) {
	_, _, client := newTest(t, Options{})
	page, err := client.Models.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
		if m.Object != "model" || m.OwnedBy != "vigthoria" || m.Created == 0 {
			t.Errorf("model %+v", m)
		}
	}
	if want := []string{"vigthoria-fast-1", "vigthoria-pro-1", "vigthoria-embed-1"}; !slices.Equal(ids, want) {
		t.Errorf("models %v, want %v", ids, want)
	}
	m, err := client.Models.Get(t.Context(), "vigthoria-pro-1")
	if err != nil || m.ID != "vigthoria-pro-1" {
		t.Errorf("Get = %+v, %v", m, err)
	}
	_, err = client.Models.Get(t.Context(), "gpt-nope")
	apiError(t, err, http.StatusNotFound, "model_not_found")
}

func TestCustomModelsAndBasePath(t *testing.T) {
	tests := []struct {
		name, basePath, path string
	}{
		{name: "nested, trailing slash", basePath: "api/openai/", path: "/api/openai/models"},
		{name: "root", basePath: "/", path: "/models"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, srv, _ := newTest(t, Options{BasePath: tt.basePath, Models: []string{"only-one"}})
			res, b := do(t, srv, http.MethodGet, tt.path, testKey, "")
			if res.StatusCode != http.StatusOK || !strings.Contains(string(b), `"id":"only-one"`) || strings.Contains(string(b), "vigthoria-fast-1") {
				t.Errorf("status %d: %s", res.StatusCode, b)
			}
			if res, _ := do(t, srv, http.MethodGet, "/v1/models", testKey, ""); res.StatusCode != http.StatusNotFound {
				t.Errorf("default base path still served: %d", res.StatusCode)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	_, srv, _ := newTest(t, Options{})
	const chat = "/v1/chat/completions"
	tests := []struct {
		name, method, path, key, body string
		status                        int
		typ, code                     string
	}{
		{"wrong key", "POST", chat, "sk-wrong", `{}`, 401, "authentication_error", "invalid_api_key"},
		{"missing key", "GET", "/v1/models", "", ``, 401, "authentication_error", "invalid_api_key"},
		{"unknown model", "POST", chat, testKey, `{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}`, 404, "invalid_request_error", "model_not_found"},
		{"bad JSON", "POST", chat, testKey, `{"model":`, 400, "invalid_request_error", "invalid_json"},
		{"wrong JSON type", "POST", chat, testKey, `{"model":"vigthoria-fast-1","messages":[{"content":5}]}`, 400, "invalid_request_error", "invalid_json"},
		{"missing messages", "POST", chat, testKey, `{"model":"vigthoria-fast-1"}`, 400, "invalid_request_error", "missing_required_parameter"},
		{"empty messages", "POST", chat, testKey, `{"model":"vigthoria-fast-1","messages":[]}`, 400, "invalid_request_error", "empty_array"},
		{"missing model", "POST", chat, testKey, `{"messages":[{"role":"user","content":"x"}]}`, 400, "invalid_request_error", "missing_required_parameter"},
		{"zero max_tokens", "POST", chat, testKey, `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"x"}],"max_tokens":0}`, 400, "invalid_request_error", "invalid_value"},
		{"stream_options without stream", "POST", chat, testKey, `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}`, 400, "invalid_request_error", "invalid_value"},
		{"missing prompt", "POST", "/v1/completions", testKey, `{"model":"vigthoria-fast-1"}`, 400, "invalid_request_error", "missing_required_parameter"},
		{"empty embedding input", "POST", "/v1/embeddings", testKey, `{"model":"vigthoria-embed-1","input":""}`, 400, "invalid_request_error", "invalid_value"},
		{"bad encoding_format", "POST", "/v1/embeddings", testKey, `{"model":"vigthoria-embed-1","input":"x","encoding_format":"hex"}`, 400, "invalid_request_error", "invalid_value"},
		{"unknown path", "POST", "/v1/chat/nope", testKey, `{}`, 404, "invalid_request_error", "unknown_url"},
		{"outside base path", "GET", "/v2/models", testKey, ``, 404, "invalid_request_error", "unknown_url"},
		{"wrong method", "GET", chat, testKey, ``, 405, "invalid_request_error", "method_not_allowed"},
		{"wrong method on model", "DELETE", "/v1/models/vigthoria-fast-1", testKey, ``, 405, "invalid_request_error", "method_not_allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, b := do(t, srv, tt.method, tt.path, tt.key, tt.body)
			if res.StatusCode != tt.status {
				t.Errorf("status %d, want %d: %s", res.StatusCode, tt.status, b)
			}
			if ct := res.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			checkCommonHeaders(t, res.Header)
			var e struct {
				Error struct {
					Message, Type string
					Code          *string
				}
			}
			if err := json.Unmarshal(b, &e); err != nil || e.Error.Message == "" || e.Error.Type != tt.typ || e.Error.Code == nil || *e.Error.Code != tt.code {
				t.Errorf("body %s (%v), want type %q code %q", b, err, tt.typ, tt.code)
			}
			if tt.status == http.StatusMethodNotAllowed && res.Header.Get("Allow") == "" {
				t.Error("405 without Allow")
			}
		})
	}
}

func TestWrongKeyWithClient(t *testing.T) {
	_, srv, _ := newTest(t, Options{})
	client := newClient(srv, "sk-wrong")
	_, err := client.Chat.Completions.New(t.Context(), openai.ChatCompletionNewParams{
		Model:    "vigthoria-fast-1",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
	})
	if aerr := apiError(t, err, http.StatusUnauthorized, "invalid_api_key"); aerr.Type != "authentication_error" {
		t.Errorf("type %q", aerr.Type)
	}
}

func TestFailCount(t *testing.T) {
	s, _, client := newTest(t, Options{})
	want := Behavior{FailStatus: http.StatusTooManyRequests, FailCount: 2, RetryAfter: 7}
	s.SetBehavior(want)
	models := func() error { _, err := client.Models.List(t.Context()); return err }
	for i := range 2 {
		aerr := apiError(t, models(), http.StatusTooManyRequests, "rate_limit_exceeded")
		h := aerr.Response.Header
		if aerr.Type != "rate_limit_error" || h.Get("Retry-After") != "7" || h.Get("X-RateLimit-Remaining") != "0" {
			t.Errorf("failure %d: type %q, Retry-After %q, remaining %q", i, aerr.Type, h.Get("Retry-After"), h.Get("X-RateLimit-Remaining"))
		}
	}
	if err := models(); err != nil {
		t.Fatalf("third request: %v", err)
	}
	if s.Count() != 3 || !reflect.DeepEqual(s.Behavior(), want) {
		t.Errorf("count %d, behavior %+v", s.Count(), s.Behavior())
	}
}

func TestFailureOrder(t *testing.T) {
	s, srv, _ := newTest(t, Options{})
	tests := []struct {
		name       string
		behavior   Behavior
		key        string
		wantStatus int
		wantJSON   bool
	}{
		{"auth before FailStatus", Behavior{FailStatus: 500, FailCount: 1}, "sk-wrong", 401, true},
		{"a rejected key spends no failure", Behavior{FailStatus: 500, FailCount: 1}, testKey, 500, true},
		{"FailStatus before Garbage", Behavior{FailStatus: 503, Garbage: true}, testKey, 503, true},
		{"auth before Garbage", Behavior{Garbage: true}, "sk-wrong", 401, true},
		{"Garbage before routing", Behavior{Garbage: true}, testKey, 200, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Consecutive cases may share a behaviour, and with it a failure budget.
			if !reflect.DeepEqual(s.Behavior(), tt.behavior) {
				s.SetBehavior(tt.behavior)
			}
			res, b := do(t, srv, http.MethodGet, "/v1/nowhere", tt.key, "")
			if res.StatusCode != tt.wantStatus || json.Valid(b) != tt.wantJSON {
				t.Errorf("status %d body %q, want %d (JSON %v)", res.StatusCode, b, tt.wantStatus, tt.wantJSON)
			}
			if ct := res.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			if tt.wantStatus == 503 && res.Header.Get("Retry-After") != "0" {
				t.Errorf("503 Retry-After %q", res.Header.Get("Retry-After"))
			}
		})
	}
}

func TestGarbageBreaksClient(t *testing.T) {
	s, _, client := newTest(t, Options{})
	s.SetBehavior(Behavior{Garbage: true})
	if _, err := client.Models.List(t.Context()); err == nil {
		t.Fatal("client accepted a garbage body")
	}
}

func TestLatency(t *testing.T) {
	s, srv, client := newTest(t, Options{})
	s.SetBehavior(Behavior{Latency: 50 * time.Millisecond})
	start := time.Now()
	if _, err := client.Models.List(t.Context()); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Errorf("answered after %v, before the latency", d)
	}

	// Latency comes before authentication, and gives up with the client.
	s.SetBehavior(Behavior{Latency: time.Minute})
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	start = time.Now()
	wrongKey := newClient(srv, "sk-wrong")
	_, err := wrongKey.Models.List(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error = %v, want the deadline rather than a 401", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("gave up after %v", d)
	}
}

func TestStallHeaders(t *testing.T) {
	s, _, client := newTest(t, Options{})
	s.SetBehavior(Behavior{StallHeaders: true})
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := client.Models.List(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error = %v, want the deadline", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("gave up after %v", d)
	}
	if s.Count() != 1 {
		t.Errorf("count = %d", s.Count())
	}
}

func TestFailMidStream(t *testing.T) {
	s, _, client := newTest(t, Options{})
	s.SetBehavior(Behavior{FailMidStream: 3})
	stream := client.Chat.Completions.NewStreaming(t.Context(), openai.ChatCompletionNewParams{
		Model:     "vigthoria-fast-1",
		Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		MaxTokens: openai.Int(10),
	})
	defer stream.Close()
	var content []string
	for stream.Next() {
		if c := stream.Current(); len(c.Choices) > 0 && c.Choices[0].Delta.Content != "" {
			content = append(content, c.Choices[0].Delta.Content)
		}
	}
	if stream.Err() == nil {
		t.Error("stream ended cleanly despite the cut")
	}
	if got := strings.Join(content, ""); got != Answer(3) {
		t.Errorf("received %q before the cut, want %q", got, Answer(3))
	}
}

func TestBreakMidBody(t *testing.T) {
	body := `{"model":"vigthoria-fast-1","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}`
	stream := `{"model":"vigthoria-fast-1","max_tokens":10,"stream":true,"messages":[{"role":"user","content":"hi"}]}`
	for _, tc := range []struct {
		name  string
		b     Behavior
		body  string
		reset bool // else stalled
	}{
		{"stall whole", Behavior{StallMidBody: 1}, body, false},
		{"reset whole", Behavior{ResetMidBody: 1}, body, true},
		{"stall stream", Behavior{StallMidBody: 3}, stream, false},
		{"reset stream", Behavior{ResetMidBody: 3}, stream, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, srv, _ := newTest(t, Options{})
			s.SetBehavior(tc.b)
			ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/chat/completions", strings.NewReader(tc.body))
			req.Header.Set("Authorization", "Bearer "+testKey)
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			got, err := io.ReadAll(res.Body)
			if res.StatusCode != http.StatusOK || len(got) == 0 {
				t.Fatalf("status %d with %d bytes, want 200 and part of the answer", res.StatusCode, len(got))
			}
			switch {
			case tc.reset && (err == nil || ctx.Err() != nil):
				t.Errorf("read error %v (deadline %v), want a reset before the deadline", err, ctx.Err())
			case !tc.reset && !errors.Is(err, context.DeadlineExceeded):
				t.Errorf("read error %v, want the body held open until the client's deadline", err)
			}
			if strings.Contains(string(got), "[DONE]") || json.Valid(got) {
				t.Errorf("the broken answer looks complete: %q", got)
			}
		})
	}
}

func TestChunkDelay(t *testing.T) {
	const delay = 50 * time.Millisecond
	s, _, client := newTest(t, Options{})
	s.SetBehavior(Behavior{ChunkDelay: delay})
	start := time.Now()
	stream := client.Chat.Completions.NewStreaming(t.Context(), openai.ChatCompletionNewParams{
		Model:     "vigthoria-fast-1",
		Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
		MaxTokens: openai.Int(2),
	})
	defer stream.Close()
	var arrivals []time.Time
	for stream.Next() {
		arrivals = append(arrivals, time.Now())
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if len(arrivals) != 4 {
		t.Fatalf("%d chunks, want 4", len(arrivals))
	}
	for i := 1; i < len(arrivals); i++ {
		// Chunk i cannot be sent before i delays have passed since the request.
		if since := arrivals[i].Sub(start); since < time.Duration(i)*delay {
			t.Errorf("chunk %d came %v after the request, want ≥ %v", i, since, time.Duration(i)*delay)
		}
		// Gaps are measured when the client got around to each chunk, which
		// may be a little late for the earlier one; allow for that.
		if gap := arrivals[i].Sub(arrivals[i-1]); gap < delay/2 {
			t.Errorf("chunk %d came %v after the previous one, want about %v", i, gap, delay)
		}
	}
}

func TestRecording(t *testing.T) {
	s, srv, _ := newTest(t, Options{})
	body := `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hi"}]}`
	do(t, srv, http.MethodPost, "/v1/chat/completions?trace=1", testKey, body)
	do(t, srv, http.MethodGet, "/v1/models", testKey, "")

	reqs := s.Requests()
	if len(reqs) != 2 || s.Count() != 2 {
		t.Fatalf("%d requests recorded, count %d", len(reqs), s.Count())
	}
	r := reqs[0]
	if r.Method != "POST" || r.Path != "/v1/chat/completions" || r.RawQuery != "trace=1" || string(r.Body) != body ||
		r.Header.Get("Authorization") != "Bearer "+testKey || time.Since(r.At) > time.Minute {
		t.Errorf("recorded %+v", r)
	}
	r.Body[0] = 'X'
	r.Header.Set("Authorization", "changed")
	if again := s.Requests()[0]; string(again.Body) != body || again.Header.Get("Authorization") != "Bearer "+testKey {
		t.Error("Requests shares memory with the recording")
	}

	s.SetBehavior(Behavior{Garbage: true})
	s.Reset()
	if len(s.Requests()) != 0 || s.Count() != 0 || !reflect.DeepEqual(s.Behavior(), Behavior{}) {
		t.Errorf("after Reset: %d requests, count %d, behavior %+v", len(s.Requests()), s.Count(), s.Behavior())
	}
}

func TestNoRecord(t *testing.T) {
	s, srv, _ := newTest(t, Options{NoRecord: true})
	do(t, srv, http.MethodGet, "/v1/models", testKey, "")
	if s.Count() != 1 || len(s.Requests()) != 0 {
		t.Errorf("count %d, %d requests recorded", s.Count(), len(s.Requests()))
	}
}

func TestUsage(t *testing.T) {
	_, srv, client := newTest(t, Options{})
	_, err := client.Chat.Completions.New(t.Context(), openai.ChatCompletionNewParams{
		Model:     "vigthoria-fast-1",
		Messages:  []openai.ChatCompletionMessageParamUnion{openai.UserMessage("two words")},
		MaxTokens: openai.Int(7),
	})
	if err != nil {
		t.Fatal(err)
	}
	res, b := do(t, srv, http.MethodGet, "/v1/usage", testKey, "")
	var u struct {
		Object, Organization string
		TotalRequests        int `json:"total_requests"`
		PromptTokens         int `json:"prompt_tokens"`
		CompletionTokens     int `json:"completion_tokens"`
		TotalTokens          int `json:"total_tokens"`
	}
	if err := json.Unmarshal(b, &u); err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("status %d body %s: %v", res.StatusCode, b, err)
	}
	if u.Object != "usage" || u.Organization != Organization || u.TotalRequests != 2 ||
		u.PromptTokens != 5 || u.CompletionTokens != 7 || u.TotalTokens != 12 {
		t.Errorf("usage = %+v", u)
	}
}

func TestRateLimitRemaining(t *testing.T) {
	_, srv, _ := newTest(t, Options{})
	remaining := func() (int, string) {
		res, _ := do(t, srv, http.MethodGet, "/v1/models", testKey, "")
		checkCommonHeaders(t, res.Header)
		n, _ := strconv.Atoi(res.Header.Get("X-RateLimit-Remaining"))
		return n, res.Header.Get("X-RateLimit-Reset")
	}
	first, reset1 := remaining()
	second, reset2 := remaining()
	if first != RateLimit-1 {
		t.Errorf("first remaining = %d", first)
	}
	want := first - 1
	if reset1 != reset2 {
		want = RateLimit - 1 // a new minute started in between and refilled the budget
	}
	if second != want {
		t.Errorf("second remaining = %d, want %d", second, want)
	}
}

func TestConcurrentUse(t *testing.T) {
	s, srv, _ := newTest(t, Options{})
	const workers, each = 16, 10
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range each {
				path, body := "/v1/chat/completions", `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":3}`
				if i%2 == 1 {
					path, body = "/v1/embeddings", `{"model":"vigthoria-embed-1","input":["a","b"]}`
				}
				req, _ := http.NewRequest(http.MethodPost, srv.URL+path, strings.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+testKey)
				res, err := srv.Client().Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if res.StatusCode != http.StatusOK && res.StatusCode != http.StatusServiceUnavailable {
					t.Errorf("status %d", res.StatusCode)
				}
			}
		})
	}
	wg.Go(func() {
		for i := range 50 {
			s.SetBehavior(Behavior{FailStatus: http.StatusServiceUnavailable, FailCount: i % 3})
			_ = s.Behavior()
			_ = s.Requests()
			s.SetBehavior(Behavior{})
		}
	})
	wg.Wait()
	if s.Count() != workers*each || len(s.Requests()) != workers*each {
		t.Errorf("count %d, %d recorded, want %d", s.Count(), len(s.Requests()), workers*each)
	}
}

func TestConfigurationPanics(t *testing.T) {
	tests := []struct {
		name string
		f    func()
	}{
		{"no API key", func() { New(Options{}) }},
		{"success status as failure", func() { New(Options{APIKey: "k"}).SetBehavior(Behavior{FailStatus: 200}) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Error("no panic")
				}
			}()
			tt.f()
		})
	}
}

func BenchmarkServeHTTP(b *testing.B) {
	s := New(Options{APIKey: testKey, NoRecord: true})
	benchmarks := []struct{ name, path, body string }{
		{"chat", "/v1/chat/completions", `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hello there"}]}`},
		{"chat stream", "/v1/chat/completions", `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hello there"}],"stream":true,"stream_options":{"include_usage":true}}`},
		{"embeddings", "/v1/embeddings", `{"model":"vigthoria-embed-1","input":["one","two"]}`},
	}
	for _, bm := range benchmarks {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				req := httptest.NewRequest(http.MethodPost, bm.path, strings.NewReader(bm.body))
				req.Header.Set("Authorization", "Bearer "+testKey)
				w := httptest.NewRecorder()
				s.ServeHTTP(w, req)
				if w.Code != http.StatusOK {
					b.Fatalf("status %d", w.Code)
				}
			}
		})
	}
}

func TestRateLimitOption(t *testing.T) {
	_, srv, _ := newTest(t, Options{RateLimit: 5})
	res, _ := do(t, srv, http.MethodGet, "/v1/models", testKey, "")
	if got := res.Header.Get("X-RateLimit-Limit"); got != "5" {
		t.Errorf("X-RateLimit-Limit = %q, want 5", got)
	}
	if got := res.Header.Get("X-RateLimit-Remaining"); got != "4" && got != "5" { // 5: a new minute began
		t.Errorf("X-RateLimit-Remaining = %q, want 4", got)
	}
}

// A Behavior confined to one model and key sends its headers and its
// failure to those requests alone; other accounts list their own models.
func TestConfinedBehaviorAndAccounts(t *testing.T) {
	s, srv, _ := newTest(t, Options{Accounts: map[string][]string{"sk-other": {"ft:private-1"}}})
	s.SetBehavior(Behavior{
		ForModel: "vigthoria-pro-1", ForKey: testKey,
		Headers:    http.Header{"x-ratelimit-remaining-tokens": {"0"}, "x-ratelimit-reset-tokens": {"720h"}},
		FailStatus: http.StatusTooManyRequests, FailCount: 1,
		FailBody: `{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}`,
	})
	chat := func(key, model string) (*http.Response, []byte) {
		return do(t, srv, http.MethodPost, "/v1/chat/completions", key, `{"model":"`+model+`","messages":[{"role":"user","content":"hi"}]}`)
	}
	if res, body := chat(testKey, "vigthoria-fast-1"); res.StatusCode != 200 || res.Header.Get("X-Ratelimit-Remaining-Tokens") != "" {
		t.Errorf("another model: %d %s, headers %v", res.StatusCode, body, res.Header)
	}
	if res, _ := chat("sk-other", "vigthoria-pro-1"); res.StatusCode != 200 {
		t.Errorf("another key: status %d", res.StatusCode)
	}
	res, body := chat(testKey, "vigthoria-pro-1")
	if res.StatusCode != 429 || !strings.Contains(string(body), "insufficient_quota") || res.Header.Get("X-Ratelimit-Reset-Tokens") != "720h" {
		t.Errorf("the model: %d %s, headers %v", res.StatusCode, body, res.Header)
	}
	if res, _ := chat(testKey, "vigthoria-pro-1"); res.StatusCode != 200 || res.Header.Get("X-Ratelimit-Remaining-Tokens") != "0" {
		t.Errorf("the model after FailCount: status %d, remaining tokens %q", res.StatusCode, res.Header.Get("X-Ratelimit-Remaining-Tokens"))
	}
	if _, body := do(t, srv, http.MethodGet, "/v1/models", "sk-other", ""); !strings.Contains(string(body), "ft:private-1") || strings.Contains(string(body), "vigthoria-fast-1") {
		t.Errorf("the other account's models: %s", body)
	}
	if _, body := do(t, srv, http.MethodGet, "/v1/models", testKey, ""); strings.Contains(string(body), "ft:private-1") {
		t.Errorf("the main account lists another's model: %s", body)
	}
}

// Enforce refuses past its own limits with a 429 of the API's shape,
// Retry-After and X-RateLimit-Remaining: 0, and counts it; MaxActive
// keeps the high-water mark.
func TestEnforce(t *testing.T) {
	s := New(Options{APIKey: "sk-test", Enforce: Enforce{Requests: 2, Window: time.Hour, Concurrent: 5}})
	srv := httptest.NewServer(s)
	defer srv.Close()
	post := func() *http.Response {
		req, _ := http.NewRequest("POST", srv.URL+"/v1/chat/completions",
			strings.NewReader(`{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer sk-test")
		req.Header.Set("Content-Type", "application/json")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	for i := range 2 {
		if res := post(); res.StatusCode != 200 {
			t.Fatalf("request %d within the limit: %d", i, res.StatusCode)
		}
	}
	res := post()
	body, _ := io.ReadAll(res.Body)
	if res.StatusCode != 429 || res.Header.Get("Retry-After") == "" || res.Header.Get("X-Ratelimit-Remaining") != "0" ||
		!strings.Contains(string(body), `"code":"rate_limit_exceeded"`) {
		t.Errorf("past the limit: %d %v %s", res.StatusCode, res.Header, body)
	}
	if s.Refused429() != 1 || s.MaxActive() != 1 {
		t.Errorf("Refused429 %d, MaxActive %d; want 1 and 1", s.Refused429(), s.MaxActive())
	}
}

// TestThink: a stream's role comes at once, and its output only after
// the silence of Think.
func TestThink(t *testing.T) {
	s, _, client := newTest(t, Options{})
	s.SetBehavior(Behavior{Think: 100 * time.Millisecond})
	stream := client.Chat.Completions.NewStreaming(t.Context(), openai.ChatCompletionNewParams{
		Model:    "vigthoria-fast-1",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
	})
	defer stream.Close()
	if !stream.Next() || stream.Current().Choices[0].Delta.Role != "assistant" {
		t.Fatalf("first event %+v, %v; want the role", stream.Current(), stream.Err())
	}
	role := time.Now()
	if !stream.Next() || stream.Current().Choices[0].Delta.Content == "" {
		t.Fatalf("second event %+v, %v; want output", stream.Current(), stream.Err())
	}
	if d := time.Since(role); d < 100*time.Millisecond {
		t.Errorf("output %v after the role, before the silence ended", d)
	}
	for stream.Next() {
	}
	if err := stream.Err(); err != nil {
		t.Error(err)
	}
}
