package wire

import (
	"strings"
	"testing"
)

// TestStreamedTokens: every delta that carries output of any kind counts,
// not only content.
func TestStreamedTokens(t *testing.T) {
	const head = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[`
	for _, tc := range []struct {
		name, choices string
		want          int64
	}{
		{"content", `{"index":0,"delta":{"content":" Hello"},"finish_reason":null}`, 1},
		{"role only", `{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}`, 0},
		{"finish", `{"index":0,"delta":{},"finish_reason":"stop"}`, 0},
		{"refusal", `{"index":0,"delta":{"refusal":"I can't"}}`, 1},
		{"reasoning_content", `{"index":0,"delta":{"reasoning_content":"Let me think"}}`, 1},
		{"reasoning", `{"index":0,"delta":{"reasoning":"hmm"}}`, 1},
		{"tool call opening", `{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}`, 1},
		{"tool call arguments", `{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"lo"}}]}}`, 1},
		{"tool call id only", `{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function"}]}}`, 0},
		{"function_call", `{"index":0,"delta":{"function_call":{"arguments":"x"}}}`, 1},
		{"audio", `{"index":0,"delta":{"audio":{"id":"a1","data":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}}`, 1},
		{"audio transcript", `{"index":0,"delta":{"audio":{"transcript":"hi"}}}`, 1},
		{"two choices", `{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}`, 2},
		{"long delta", `{"index":0,"delta":{"content":"` + strings.Repeat("x", 16+40) + `"}}`, 11},
		{"logprobs are not output", `{"index":0,"delta":{"content":""},"logprobs":{"content":[{"token":"x"}]}}`, 0},
		{"finish_reason after a null delta", `{"index":0,"delta":null,"finish_reason":"stop"}`, 0},
		{"usage chunk", ``, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev := head + tc.choices + `]}` + "\n\n"
			if got := StreamedTokens([]byte(ev)); got != tc.want {
				t.Errorf("StreamedTokens(%s) = %d, want %d", ev, got, tc.want)
			}
		})
	}
	completion := `data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"text":" world","index":0,"logprobs":null,"finish_reason":null}]}` + "\n\n"
	if got := StreamedTokens([]byte(completion)); got != 1 {
		t.Errorf("a completion's text chunk counts %d, want 1", got)
	}
	for _, junk := range []string{`data: {"choices":[{"delta":{"content":"x`, `data: "choices":[`, `data: {"choices":[}}}}]]]`, `"choices":[{"delta":{"x":"\`} {
		StreamedTokens([]byte(junk)) // no panic, no endless loop
	}
}
