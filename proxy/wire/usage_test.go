package wire

import "testing"

func TestParseUsage(t *testing.T) {
	cases := []struct {
		in      string
		ok      bool
		figures [5]int64 // prompt, completion, cached, reasoning, total
		garbled bool
	}{
		{`{"usage":{"prompt_tokens":1,"completion_tokens":2}}`, true, [5]int64{1, 2, 0, 0, 0}, false},
		{`{"usage": {"completion_tokens": 9, "prompt_tokens": 4, "total_tokens": 13}}`, true, [5]int64{4, 9, 0, 0, 13}, false},
		{`{"usage":{"prompt_tokens":8,"total_tokens":8}}`, true, [5]int64{8, 0, 0, 0, 8}, false}, // embeddings
		{`{"usage":null}`, false, [5]int64{0, 0, 0, 0, 0}, false},
		{`{"choices":[]}`, false, [5]int64{0, 0, 0, 0, 0}, false},
		{`{"usage":{"total_tokens":8}}`, false, [5]int64{0, 0, 0, 0, 0}, false},
		// Nested details, as OpenAI-compatible servers send them: read
		// as JSON, not up to the first '}', for their two counts.
		{`{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens":500}}`, true, [5]int64{10, 500, 0, 0, 0}, false},
		{`{"usage":{"completion_tokens_details":{"reasoning_tokens":7,"completion_tokens":1},"completion_tokens":20,"prompt_tokens":3}}`, true, [5]int64{3, 20, 0, 7, 0}, false},
		{`{"usage":{"prompt_tokens":2048,"completion_tokens":300,"total_tokens":2348,` +
			`"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":1920},` +
			`"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":256,"rejected_prediction_tokens":0}}}`,
			true, [5]int64{2048, 300, 1920, 256, 2348}, false},
		{`{"usage":{"prompt_tokens":5,"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":null}}}`, true, [5]int64{5, 0, 0, 0, 0}, false},
		{`{"usage":{"prompt_tokens":1e6,"completion_tokens":2.0}}`, true, [5]int64{1_000_000, 2, 0, 0, 0}, false},
		// Figures that are not counts: the usage was reported, garbled.
		{`{"usage":{"prompt_tokens":"x"}}`, true, [5]int64{0, 0, 0, 0, 0}, true},
		{`{"usage":{"prompt_tokens":1.5,"completion_tokens":-2}}`, true, [5]int64{0, 0, 0, 0, 0}, true},
		{`{"usage":{"prompt_tokens":9000000000000000000,"completion_tokens":5}}`, true, [5]int64{0, 5, 0, 0, 0}, true},
		{`{"usage":{"prompt_tokens":9e18,"completion_tokens":5}}`, true, [5]int64{0, 5, 0, 0, 0}, true},
		{`{"usage":{"prompt_tokens":3,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":-1}}}`, true, [5]int64{3, 5, 0, 0, 0}, true},
		{`{"usage":{"prompt_tokens":3,"completion_tokens":5,"completion_tokens_details":7}}`, true, [5]int64{3, 5, 0, 0, 0}, true},
		{`{"usage":{"prompt_tokens":10,"completion_tok`, false, [5]int64{0, 0, 0, 0, 0}, false}, // cut short
	}
	for _, tc := range cases {
		u, ok := ParseUsage([]byte(tc.in))
		got := [5]int64{u.Prompt, u.Completion, u.Cached, u.Reasoning, u.Total}
		if ok != tc.ok || got != tc.figures || (u.Garbled != "") != tc.garbled {
			t.Errorf("ParseUsage(%s) = %v %v garbled %q, want %v %v garbled %v", tc.in, ok, got, u.Garbled, tc.ok, tc.figures, tc.garbled)
		}
	}
}

// TestParseUsageSaysWhatItGives: a figure the usage object leaves out, or
// gives as null, is not given, which a charge must tell from a zero.
func TestParseUsageSaysWhatItGives(t *testing.T) {
	for _, tc := range []struct {
		in                    string
		prompt, output, total bool
	}{
		{`{"usage":{"prompt_tokens":5,"completion_tokens":0,"total_tokens":5}}`, true, true, true},
		{`{"usage":{"prompt_tokens":5,"total_tokens":105}}`, true, false, true},
		{`{"usage":{"prompt_tokens":5,"completion_tokens":null}}`, true, false, false},
		{`{"usage":{"completion_tokens":7}}`, false, true, false},
		{`{"usage":{"completion_tokens":7,"total_tokens":9,"total_tokens":null}}`, false, true, false},
	} {
		u, ok := ParseUsage([]byte(tc.in))
		if !ok || u.HasPrompt != tc.prompt || u.HasCompletion != tc.output || u.HasTotal != tc.total {
			t.Errorf("ParseUsage(%s): %v, gives prompt %v, completion %v, total %v; want %v %v %v",
				tc.in, ok, u.HasPrompt, u.HasCompletion, u.HasTotal, tc.prompt, tc.output, tc.total)
		}
	}
}
