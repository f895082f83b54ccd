package wire

import (
	"encoding/json"
	"strings"
	"testing"
)

var jsonSeeds = []string{
	``, ` `, `{}`, `[]`, `{"a":1}`, `{"a":[1,2,{"b":null}],"c":"d"}`, ` [ true , false , null ] `,
	`"\u00e9\n\"\\"`, `"\u00g0"`, `"\x"`, "\"\x01\"", "\"\xff\"", `-0`, `-01`, `1.`, `1.5e+10`, `1e`, `.5`,
	`{"a":}`, `{"a" 1}`, `{,}`, `[1,]`, `[1 2]`, `{"a":1,}`, `nul`, `truex`, `1 2`, `{"a":1}}`, `[[]`,
	`{"id":"chatcmpl-1","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":9}}`,
}

func TestValidJSON(t *testing.T) {
	deep := func(n int, open, close string) string { return strings.Repeat(open, n) + strings.Repeat(close, n) }
	cases := append([]string{}, jsonSeeds...)
	cases = append(cases, deep(maxJSONDepth, "[", "]"), deep(maxJSONDepth+1, "[", "]"),
		deep(maxJSONDepth-1, `{"a":`, "}"), deep(maxJSONDepth+1, `{"a":`, "}"))
	for _, c := range cases {
		if got, want := ValidJSON([]byte(c)), json.Valid([]byte(c)); got != want {
			t.Errorf("ValidJSON(%.40q) = %v, json.Valid says %v", c, got, want)
		}
	}
}

func FuzzValidJSON(f *testing.F) {
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := ValidJSON(b), json.Valid(b); got != want {
			t.Errorf("ValidJSON(%q) = %v, json.Valid says %v", b, got, want)
		}
	})
}

func BenchmarkValidJSON(b *testing.B) {
	answer := []byte(`{"id":"chatcmpl-000000000001","object":"chat.completion","created":1795650000,"model":"vigthoria-fast-1","choices":[{"index":0,"message":{"role":"assistant","content":"This is the Vigthoria stand-in answering your request with a deterministic reply. This is the Vigthoria stand-in answering"},"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":16,"total_tokens":25}}`)
	b.SetBytes(int64(len(answer)))
	b.ReportAllocs()
	for b.Loop() {
		if !ValidJSON(answer) {
			b.Fatal("invalid")
		}
	}
}
