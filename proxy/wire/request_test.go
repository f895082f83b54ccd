package wire

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseRequest(t *testing.T) {
	cases := []struct {
		name, body string
		want       RequestInfo
		bad        bool
	}{
		{"chat", `{"model":"m","messages":[]}`, RequestInfo{Model: "m", N: 1, Choices: 1}, false},
		{"stream with usage", `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`,
			RequestInfo{Model: "m", Stream: true, IncludeUsage: true, N: 1, hasStreamOpt: true, Choices: 1}, false},
		{"max_tokens", `{"max_tokens":50,"n":3}`, RequestInfo{MaxTokens: 50, N: 3, hasMaxTokens: true, maxTokens: 50, Choices: 3}, false},
		{"max_tokens null", `{"max_tokens":null}`, RequestInfo{N: 1, hasMaxTokens: true, Choices: 1}, false},
		{"max_completion_tokens", `{"max_completion_tokens":70}`, RequestInfo{MaxTokens: 70, N: 1, hasMaxCompletion: true, maxCompletion: 70, Choices: 1}, false},
		{"not json", `model=m`, RequestInfo{}, true},
		{"array", `[{"model":"m"}]`, RequestInfo{}, true},
		{"truncated", `{"model":"m"`, RequestInfo{}, true},
		{"empty", ``, RequestInfo{}, true},
		{"wrong type", `{"max_tokens":"many"}`, RequestInfo{}, true},
		{"negative max_tokens", `{"max_tokens":-1}`, RequestInfo{}, true},
		{"fractional max_tokens", `{"max_tokens":1.5}`, RequestInfo{}, true},
		{"stream_options not an object", `{"stream_options":3}`, RequestInfo{}, true},
		{"n zero", `{"n":0}`, RequestInfo{}, true},
		{"escaped key is the field", `{"mod\u0065l":"vigthoria-pro-1","max_\u0074okens":9}`,
			RequestInfo{Model: "vigthoria-pro-1", MaxTokens: 9, N: 1, hasMaxTokens: true, maxTokens: 9, Choices: 1}, false},
		{"escaped value", `{"model":"vig\u0074horia"}`, RequestInfo{Model: "vigthoria", N: 1, Choices: 1}, false},
		{"invalid UTF-8 read as a decoder reads it", "{\"model\":\"fast-\x8d\"}", RequestInfo{Model: "fast-\uFFFD", N: 1, Choices: 1}, false},
		{"the larger of the two limits", `{"max_tokens":10,"max_completion_tokens":100000}`,
			RequestInfo{MaxTokens: 100000, N: 1, hasMaxTokens: true, hasMaxCompletion: true, maxTokens: 10, maxCompletion: 100000, Choices: 1}, false},
		{"nested fields are not the request's", `{"messages":[{"model":"x","max_tokens":1}],"metadata":{"n":99}}`,
			RequestInfo{N: 1, Choices: 1}, false},
		{"model twice", `{"model":"vigthoria-fast-1","model":"vigthoria-pro-1"}`, RequestInfo{}, true},
		{"model twice, once escaped", `{"model":"vigthoria-fast-1","m\u006fdel":"vigthoria-pro-1"}`, RequestInfo{}, true},
		{"max_tokens twice", `{"max_tokens":1,"max_tokens":100000}`, RequestInfo{}, true},
		{"model not a string", `{"model":7}`, RequestInfo{}, true},
		{"stream not a boolean", `{"stream":"yes"}`, RequestInfo{}, true},
		{"trailing garbage", `{"model":"m"} {}`, RequestInfo{}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseRequest([]byte(tc.body))
			got.PromptTokens = 0 // TestPromptEstimate
			if tc.bad {
				if !isInvalid(err) {
					t.Fatalf("got %+v %v, want it refused as invalid", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("got %+v %v, want %+v", got, err, tc.want)
			}
		})
	}
}

func TestWithStreamUsage(t *testing.T) {
	cases := []struct{ in, want string }{
		{`{"model":"m","stream":true}`, `{"stream_options":{"include_usage":true},"model":"m","stream":true}`},
		{` { "stream" : true }`, ` {"stream_options":{"include_usage":true}, "stream" : true }`},
		{`{"stream":true,"stream_options":{"include_usage":true}}`, `{"stream":true,"stream_options":{"include_usage":true}}`},
		{`{"stream":true,"stream_options":{}}`, `{"stream":true,"stream_options":{"include_usage":true}}`},
		{`{"stream":true,"stream_options":null}`, `{"stream":true,"stream_options":{"include_usage":true}}`},
	}
	for _, tc := range cases {
		info, apiErr := ParseRequest([]byte(tc.in))
		if apiErr != nil {
			t.Fatal(apiErr)
		}
		got, err := WithStreamUsage([]byte(tc.in), info)
		if err != nil {
			t.Fatal(err)
		}
		if !jsonEqual(t, got, []byte(tc.want)) {
			t.Errorf("WithStreamUsage(%s) = %s, want %s", tc.in, got, tc.want)
		}
		if !info.hasStreamOpt && string(got) != tc.want {
			t.Errorf("WithStreamUsage(%s) = %s, want the client's bytes kept: %s", tc.in, got, tc.want)
		}
	}
}

func TestSetCap(t *testing.T) {
	for _, tc := range []struct{ field, in, want string }{
		{MaxTokensField, `{"model":"m"}`, `{"max_tokens":256,"model":"m"}`},
		{MaxTokensField, `{}`, `{"max_tokens":256}`},
		{MaxTokensField, `{"max_tokens":null,"model":"m"}`, `{"max_tokens":256,"model":"m"}`},
		{MaxCompletionTokensField, `{"model":"m"}`, `{"max_completion_tokens":256,"model":"m"}`},
		{MaxCompletionTokensField, `{"max_completion_tokens":null,"model":"m"}`, `{"max_completion_tokens":256,"model":"m"}`},
		{MaxTokensField, `{"max_completion_tokens":300,"model":"m"}`, `{"max_tokens":256,"max_completion_tokens":300,"model":"m"}`},
	} {
		info, _ := ParseRequest([]byte(tc.in))
		got, err := SetCap([]byte(tc.in), info, tc.field, 256)
		if err != nil || !jsonEqual(t, got, []byte(tc.want)) {
			t.Errorf("SetCap(%s, %s) = %s %v, want %s", tc.in, tc.field, got, err, tc.want)
		}
	}
}

func TestCapFields(t *testing.T) {
	for _, tc := range []struct{ in, capField, named string }{
		{`{}`, "", ""},
		{`{"max_tokens":null}`, "", MaxTokensField},
		{`{"max_completion_tokens":null}`, "", MaxCompletionTokensField},
		{`{"max_tokens":5}`, MaxTokensField, MaxTokensField},
		{`{"max_completion_tokens":5}`, MaxCompletionTokensField, MaxCompletionTokensField},
		{`{"max_tokens":5,"max_completion_tokens":9}`, MaxCompletionTokensField, MaxTokensField},
		{`{"max_tokens":9,"max_completion_tokens":5}`, MaxTokensField, MaxTokensField},
	} {
		info, err := ParseRequest([]byte(tc.in))
		if err != nil || info.CapField() != tc.capField || info.NamedCapField() != tc.named {
			t.Errorf("%s: cap field %q, named %q (%v), want %q and %q", tc.in, info.CapField(), info.NamedCapField(), err, tc.capField, tc.named)
		}
	}
}

func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatalf("%s: %v", a, err)
	}
	json.Unmarshal(b, &y)
	xa, _ := json.Marshal(x)
	ya, _ := json.Marshal(y)
	return string(xa) == string(ya)
}

// TestOtherSpellingsAreRefused: a key that folds to a policed field, as
// strings.EqualFold and encoding/json fold, without being it, is refused
// with a message naming it: the upstream may read it as the field.
func TestOtherSpellingsAreRefused(t *testing.T) {
	for _, tc := range []struct{ name, body, field string }{
		{"Model beside model", `{"model":"vigthoria-fast-1","Model":"vigthoria-pro-1"}`, "model"},
		{"MODEL alone", `{"MODEL":"vigthoria-pro-1"}`, "model"},
		{"MAX_TOKENS", `{"max_tokens":256,"MAX_TOKENS":3000}`, "max_tokens"},
		{"Max_Tokens", `{"Max_Tokens":3000}`, "max_tokens"},
		{"long s (U+017F)", `{"max_tokens":256,"max_token` + "\u017f" + `":3000}`, "max_tokens"},
		{"long s escaped", `{"max_token\u017f":3000}`, "max_tokens"},
		{"Kelvin sign (U+212A)", `{"max_to` + "\u212a" + `ens":3000}`, "max_tokens"},
		{"Kelvin sign escaped", `{"max_to\u212Aens":3000}`, "max_tokens"},
		{"N", `{"n":1,"N":64}`, "n"},
		{"N escaped", `{"\u004e":64}`, "n"},
		{"Model escaped", `{"\u004dodel":"vigthoria-pro-1"}`, "model"},
		{"MAX_COMPLETION_TOKENS", `{"MAX_COMPLETION_TOKENS":3000}`, "max_completion_tokens"},
		{"Stream", `{"Stream":true}`, "stream"},
		{"ſtream (U+017F)", `{"` + "\u017f" + `tream":true}`, "stream"},
		{"Stream_Options", `{"stream":true,"Stream_Options":{"include_usage":false}}`, "stream_options"},
		{"INCLUDE_USAGE nested", `{"stream":true,"stream_options":{"INCLUDE_USAGE":true}}`, "include_usage"},
		{"include_uſage nested", `{"stream":true,"stream_options":{"include_u` + "\u017f" + `age":true}}`, "include_usage"},
		{"include_usage escaped and folded", `{"stream":true,"stream_options":{"include_u\u017Fage":true}}`, "include_usage"},
		{"Prompt", `{"prompt":"a","Prompt":["a","b","c"]}`, "prompt"},
		{"INPUT", `{"INPUT":["a","b"]}`, "input"},
		{"Best_Of", `{"Best_Of":20}`, "best_of"},
		{"beſt_of", `{"be` + "\u017f" + `t_of":20}`, "best_of"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseRequest([]byte(tc.body))
			if err == nil {
				t.Fatalf("ParseRequest(%s) = %+v, want a 400", tc.body, got)
			}
			if !isInvalid(err) {
				t.Errorf("got %v, want it refused as invalid", err)
			}
			if !strings.Contains(err.Error(), tc.field) {
				t.Errorf("message %q does not name %s", err, tc.field)
			}
		})
	}
	// Keys that only look alike, and policed names where they are not
	// the request's, pass.
	for _, body := range []string{
		`{"model":"m","models":"x","Modell":1,"MESSAGES":[],"nn":2,"N_":3,"max_tokens_":1}`,
		`{"messages":[{"Model":"x","MAX_TOKENS":1,"N":9}],"metadata":{"Stream":true}}`,
		`{"stream":true,"stream_options":{"include_usage":true,"Other":1}}`,
		`{"mödel":"x","ın":1,"İnput":2}`, // dotless and dotted i fold to no ASCII letter
	} {
		if _, err := ParseRequest([]byte(body)); err != nil {
			t.Errorf("ParseRequest(%s): %v, want it accepted", body, err)
		}
	}
}

// TestMultipliers: every answer the upstream generates is a choice,
// counted in the reservation.
func TestMultipliers(t *testing.T) {
	for _, tc := range []struct {
		name, body      string
		prompts, choice int64
	}{
		{"one prompt", `{"prompt":"hello"}`, 1, 1},
		{"prompt array of strings", `{"prompt":["a","b","c"],"n":2}`, 3, 6},
		{"prompt token array is one prompt", `{"prompt":[1,2,3,4]}`, 1, 1},
		{"prompt array of token arrays", `{"prompt":[[1,2],[3],[4,5,6]]}`, 3, 3},
		{"best_of over n", `{"prompt":["a","b"],"n":2,"best_of":5}`, 2, 10},
		{"embedding inputs", `{"input":["a","b","c","d"]}`, 4, 4},
		{"n alone", `{"n":7}`, 0, 7},
		{"null prompt", `{"prompt":null}`, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseRequest([]byte(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if got.Prompts != tc.prompts || got.Choices != tc.choice {
				t.Errorf("prompts %d choices %d, want %d and %d", got.Prompts, got.Choices, tc.prompts, tc.choice)
			}
			if want := got.PromptTokens + tc.choice*256; got.Estimate(256) != want {
				t.Errorf("Estimate(256) = %d, want %d", got.Estimate(256), want)
			}
		})
	}
	for _, tc := range []struct{ name, body string }{
		{"best_of under n", `{"n":3,"best_of":2}`},
		{"best_of zero", `{"best_of":0}`},
		{"best_of absurd", `{"best_of":100000}`},
		{"n absurd", `{"n":1000}`},
		{"too many prompts", `{"prompt":[` + strings.Repeat(`"a",`, 2048) + `"a"]}`},
		{"too many choices", `{"prompt":[` + strings.Repeat(`"a",`, 99) + `"a"],"n":100}`},
		{"prompt not a string", `{"prompt":7}`},
		{"mixed prompt array", `{"prompt":["a",[1,2]]}`},
		{"nested too deep", `{"prompt":[[[1]]]}`},
		{"token IDs not integers", `{"prompt":[1.5,2]}`},
		{"negative token ID", `{"input":[[-1]]}`},
		{"strings in a token array", `{"input":[["a"]]}`},
		{"input an object", `{"input":{"a":1}}`},
		{"max_tokens past an int32", `{"max_tokens":4294967296}`},
		{"max_tokens to overflow", `{"max_tokens":9223372036854775807,"n":4}`},
		{"include_usage not a boolean", `{"stream":true,"stream_options":{"include_usage":1}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, err := ParseRequest([]byte(tc.body)); !isInvalid(err) {
				t.Errorf("got %+v %v, want it refused as invalid", got, err)
			}
		})
	}
}

// TestPromptEstimate: token IDs are counted exactly, the rest of the body
// at bytesPerToken.
func TestPromptEstimate(t *testing.T) {
	ids := `[` + strings.Repeat(`50256,`, 999) + `50256]`
	body := `{"model":"m","prompt":` + ids + `}`
	got, err := ParseRequest([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(1000 + (len(body)-len(ids))/bytesPerToken); got.PromptTokens != want {
		t.Errorf("prompt of 1000 token IDs estimated at %d tokens, want %d", got.PromptTokens, want)
	}
	body = `{"model":"m","input":[` + ids + `,[1,2,3]]}`
	got, _ = ParseRequest([]byte(body))
	if want := int64(1003 + (len(body)-len(ids)-len(`[1,2,3]`))/bytesPerToken); got.PromptTokens != want || got.Prompts != 2 {
		t.Errorf("input of 2 token arrays: %d prompts estimated at %d tokens, want 2 and %d", got.Prompts, got.PromptTokens, want)
	}
	text := `{"model":"m","prompt":"` + strings.Repeat("word ", 100) + `"}`
	got, _ = ParseRequest([]byte(text))
	if want := int64(len(text) / bytesPerToken); got.PromptTokens != want {
		t.Errorf("a text prompt estimated at %d tokens, want %d", got.PromptTokens, want)
	}
}

// TestTokenIDsCostNoAllocation checks that a prompt given as token IDs is
// counted without an allocation per ID: a hostile body of a million IDs
// must not cost a million allocations.
func TestTokenIDsCostNoAllocation(t *testing.T) {
	ids := strings.Repeat("50256,", 10_000)
	body := []byte(`{"model":"m","prompt":[[` + ids + `1],[` + ids + `2]]}`)
	allocs := testing.AllocsPerRun(10, func() {
		if _, apiErr := ParseRequest(body); apiErr != nil {
			t.Fatal(apiErr)
		}
	})
	if allocs > 2 {
		t.Errorf("ParseRequest of 20,002 token IDs: %.0f allocations, want at most 2", allocs)
	}
}

// isInvalid reports whether err refuses a body, as the proxy answers
// with 400 invalid_request.
func isInvalid(err error) bool {
	_, ok := err.(InvalidRequest)
	return ok
}
