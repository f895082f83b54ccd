package proxy

import (
	"encoding/json"
	"testing"
)

func TestParseRequest(t *testing.T) {
	cases := []struct {
		name, body string
		want       RequestInfo
		bad        bool
	}{
		{"chat", `{"model":"m","messages":[]}`, RequestInfo{Model: "m", N: 1}, false},
		{"stream with usage", `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`,
			RequestInfo{Model: "m", Stream: true, IncludeUsage: true, N: 1, hasStreamOpt: true}, false},
		{"max_tokens", `{"max_tokens":50,"n":3}`, RequestInfo{MaxTokens: 50, N: 3, hasMaxTokens: true}, false},
		{"max_tokens null", `{"max_tokens":null}`, RequestInfo{N: 1, hasMaxTokens: true}, false},
		{"max_completion_tokens", `{"max_completion_tokens":70}`, RequestInfo{MaxTokens: 70, N: 1}, false},
		{"not json", `model=m`, RequestInfo{}, true},
		{"array", `[{"model":"m"}]`, RequestInfo{}, true},
		{"truncated", `{"model":"m"`, RequestInfo{}, true},
		{"empty", ``, RequestInfo{}, true},
		{"wrong type", `{"max_tokens":"many"}`, RequestInfo{}, true},
		{"negative max_tokens", `{"max_tokens":-1}`, RequestInfo{}, true},
		{"fractional max_tokens", `{"max_tokens":1.5}`, RequestInfo{}, true},
		{"stream_options not an object", `{"stream_options":3}`, RequestInfo{}, true},
		{"n zero", `{"n":0}`, RequestInfo{}, true},
		// Keys match exactly, as the upstream's parser matches them.
		{"other case is another field", `{"model":"vigthoria-pro-1","Model":"vigthoria-fast-1","MAX_TOKENS":5}`,
			RequestInfo{Model: "vigthoria-pro-1", N: 1}, false},
		{"other case in stream_options", `{"stream":true,"stream_options":{"INCLUDE_USAGE":true}}`,
			RequestInfo{Stream: true, N: 1, hasStreamOpt: true}, false},
		{"escaped key is the field", `{"mod\u0065l":"vigthoria-pro-1","max_\u0074okens":9}`,
			RequestInfo{Model: "vigthoria-pro-1", MaxTokens: 9, N: 1, hasMaxTokens: true}, false},
		{"escaped value", `{"model":"vig\u0074horia"}`, RequestInfo{Model: "vigthoria", N: 1}, false},
		{"invalid UTF-8 read as a decoder reads it", "{\"model\":\"fast-\x8d\"}", RequestInfo{Model: "fast-\uFFFD", N: 1}, false},
		{"the larger of the two limits", `{"max_tokens":10,"max_completion_tokens":100000}`,
			RequestInfo{MaxTokens: 100000, N: 1, hasMaxTokens: true}, false},
		{"nested fields are not the request's", `{"messages":[{"model":"x","max_tokens":1}],"metadata":{"n":99}}`,
			RequestInfo{N: 1}, false},
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
			if tc.bad {
				if err == nil || err.Status != 400 {
					t.Fatalf("got %+v %v, want a 400", got, err)
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

func TestSetMaxTokens(t *testing.T) {
	for in, want := range map[string]string{
		`{"model":"m"}`:                   `{"max_tokens":256,"model":"m"}`,
		`{}`:                              `{"max_tokens":256}`,
		`{"max_tokens":null,"model":"m"}`: `{"max_tokens":256,"model":"m"}`,
	} {
		info, _ := ParseRequest([]byte(in))
		got, err := SetMaxTokens([]byte(in), info, 256)
		if err != nil || !jsonEqual(t, got, []byte(want)) {
			t.Errorf("SetMaxTokens(%s) = %s %v, want %s", in, got, err, want)
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
