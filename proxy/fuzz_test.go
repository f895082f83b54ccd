package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"

	"go.uber.org/zap"
)

func FuzzSSEBody(f *testing.F) {
	f.Add([]byte("data: {\"a\":1}\n\ndata: [DONE]\n\n"), uint8(7), true)
	f.Add([]byte("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n"), uint8(3), true)
	f.Add([]byte("data: {\"a\":"), uint8(1), false)
	f.Add([]byte(": comment\r\n\r\nevent: x\ndata: y\n\n"), uint8(200), false)
	f.Fuzz(func(t *testing.T, stream []byte, chunk uint8, strip bool) {
		size := int(chunk%64) + 1
		var chunks []string
		for s := string(stream); len(s) > 0; {
			n := min(size, len(s))
			chunks, s = append(chunks, s[:n]), s[n:]
		}
		c := &Call{StripUsage: strip}
		b := newSSEBody(context.Background(), &chunkedReader{chunks: chunks, err: io.EOF}, zap.NewNop(), c)
		out, err := io.ReadAll(b)
		b.Close()
		if err != nil {
			t.Fatalf("the body ended with %v, want a clean end", err)
		}
		// The stream's last event is data: [DONE], on a line of its own.
		complete := bytes.Equal(stream, []byte("data: [DONE]\n\n")) || bytes.HasSuffix(stream, []byte("\n\ndata: [DONE]\n\n"))
		switch {
		case bytes.HasSuffix(out, errUpstreamStream.sseEvent()):
			if complete && !strip && bytes.Count(stream, []byte("[DONE]")) == 1 && !bytes.Contains(stream, []byte("\r")) {
				t.Errorf("a complete stream was ended as broken:\n%q", stream)
			}
		case !strip && !bytes.Equal(out, stream):
			t.Errorf("the stream changed:\n in %q\nout %q", stream, out)
		}
	})
}

func FuzzRequestEdits(f *testing.F) {
	for _, s := range []string{`{"model":"m","stream":true}`, `{"stream_options":null,"max_tokens":null}`, `{"stream_options":{}}`, `[]`,
		`{"n":3,"max_tokens":5}`, `{} `, "{\"a\":\"\\u0000\"}", `{"Model":"a","model":"b","MAX_TOKENS":1}`,
		`{"mod\u0065l":"x","max_completion_tokens":9}`, `{"model":"a","model":"b"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		info, apiErr := ParseRequest(body)
		if apiErr != nil {
			return
		}
		// What the upstream reads: keys matched exactly, unescaped.
		fields := exactFields(t, body)
		if want := stringValue(fields["model"]); info.Model != want {
			t.Errorf("ParseRequest(%q): model %q, the upstream reads %q", body, info.Model, want)
		}
		if want := max(intValue(fields["max_tokens"]), intValue(fields["max_completion_tokens"])); info.MaxTokens != want {
			t.Errorf("ParseRequest(%q): max tokens %d, the upstream reads %d", body, info.MaxTokens, want)
		}
		if want := string(fields["stream"]) == "true"; info.Stream != want {
			t.Errorf("ParseRequest(%q): stream %v, the upstream reads %v", body, info.Stream, want)
		}

		withUsage, err := WithStreamUsage(body, info)
		if err != nil {
			return
		}
		opts := exactFields(t, exactFields(t, withUsage)["stream_options"])
		if string(opts["include_usage"]) != "true" {
			t.Errorf("WithStreamUsage(%q) = %q: not asking for usage", body, withUsage)
		}
		capped, err := SetMaxTokens(body, info, 7)
		if err != nil {
			return
		}
		if got := exactFields(t, capped)["max_tokens"]; string(got) != "7" {
			t.Errorf("SetMaxTokens(%q) = %q: max_tokens is %s, not 7", body, capped, got)
		}
	})
}

// exactFields decodes a JSON object's fields by their exact keys, as an
// upstream does, failing the test if it is not one.
func exactFields(t *testing.T, obj []byte) map[string]json.RawMessage {
	t.Helper()
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(obj, &fields); err != nil {
		t.Fatalf("%q is not a JSON object: %v", obj, err)
	}
	return fields
}

func stringValue(raw json.RawMessage) string {
	var s string
	_ = json.Unmarshal(raw, &s) // absent or null: ""
	return s
}

func intValue(raw json.RawMessage) int64 {
	var n int64
	_ = json.Unmarshal(raw, &n)
	return n
}

// FuzzPolicedFields: for every body ParseRequest accepts, a
// case-insensitive decoder (encoding/json into a struct, as a Go upstream
// reads it) and an exact one (as a Python upstream reads it) read the same
// policed values, and they are the values the proxy polices.
func FuzzPolicedFields(f *testing.F) {
	for _, s := range []string{
		`{"model":"a","Model":"b"}`, `{"max_tokens":1,"MAX_TOKENS":3000}`, "{\"max_token\u017f\":3000}",
		`{"max_to\u212aens":5}`, `{"n":1,"N":64}`, `{"stream":true,"stream_options":{"INCLUDE_USAGE":true}}`,
		`{"\u004dodel":"x"}`, `{"prompt":["a","b"],"n":2,"best_of":3}`, `{"input":[[1,2],[3]]}`, `{"prompt":[1,2,3]}`,
		`{"Best_of":4}`, `{"model":"m","messages":[{"Model":"x"}],"stream_options":null}`, `{"mödel":"x","ın":2}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		info, apiErr := ParseRequest(body)
		if apiErr != nil {
			return
		}
		var folded struct {
			Model               *string
			MaxTokens           *int64 `json:"max_tokens"`
			MaxCompletionTokens *int64 `json:"max_completion_tokens"`
			N                   *int64
			BestOf              *int64 `json:"best_of"`
			Stream              *bool
			StreamOptions       *struct {
				IncludeUsage *bool `json:"include_usage"`
			} `json:"stream_options"`
			Prompt json.RawMessage
			Input  json.RawMessage
		}
		if err := json.Unmarshal(body, &folded); err != nil {
			t.Fatalf("ParseRequest accepted %q, which encoding/json cannot read into the policed fields: %v", body, err)
		}
		exact := exactFields(t, body)
		var opts map[string]json.RawMessage
		if raw := exact["stream_options"]; len(raw) > 0 && raw[0] == '{' {
			opts = exactFields(t, raw)
		}
		check := func(field string, foldedValue, exactValue, policed any) {
			t.Helper()
			if foldedValue != exactValue || exactValue != policed {
				t.Errorf("%q: %s is %v to encoding/json, %v to an exact reader, %v to the proxy", body, field, foldedValue, exactValue, policed)
			}
		}
		check("model", deref(folded.Model), stringValue(exact["model"]), info.Model)
		check("max tokens", max(deref(folded.MaxTokens), deref(folded.MaxCompletionTokens)),
			max(intValue(exact["max_tokens"]), intValue(exact["max_completion_tokens"])), info.MaxTokens)
		check("n", max(deref(folded.N), 1), max(intValue(exact["n"]), 1), info.N)
		check("best_of", deref(folded.BestOf), intValue(exact["best_of"]), info.BestOf)
		check("stream", deref(folded.Stream), string(exact["stream"]) == "true", info.Stream)
		var foldedUsage bool
		if folded.StreamOptions != nil {
			foldedUsage = deref(folded.StreamOptions.IncludeUsage)
		}
		check("stream_options.include_usage", foldedUsage, string(opts["include_usage"]) == "true", info.IncludeUsage)
		check("prompt", string(folded.Prompt), string(exact["prompt"]), string(exact["prompt"]))
		check("input", string(folded.Input), string(exact["input"]), string(exact["input"]))
		// The reservation counts every answer: n or best_of for each prompt.
		prompts := max(countItems(exact["prompt"]), countItems(exact["input"]))
		if want := max(prompts, 1) * max(info.N, info.BestOf); info.Choices != want || info.Prompts != prompts {
			t.Errorf("%q: %d prompts, %d choices; want %d and %d", body, info.Prompts, info.Choices, prompts, want)
		}
	})
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// countItems counts the prompts of a prompt or input value: an array of
// strings or of arrays is one a element, anything else one, null none.
func countItems(raw json.RawMessage) int64 {
	var items []json.RawMessage
	switch {
	case len(raw) == 0 || string(raw) == "null":
		return 0
	case json.Unmarshal(raw, &items) != nil:
		return 1 // a string
	case len(items) > 0 && (items[0][0] == '"' || items[0][0] == '['):
		return int64(len(items))
	case len(items) > 0:
		return 1 // token IDs
	}
	return 0
}

// FuzzParseUsage holds the usage reader to encoding/json: whenever it reads
// a usage object, decoding that object with encoding/json gives the same
// top-level prompt_tokens and completion_tokens, whatever the key order,
// nesting and number spelling.
func FuzzParseUsage(f *testing.F) {
	f.Add([]byte(`{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens":500}}`))
	f.Add([]byte(`data: {"choices":[],"usage":{"completion_tokens":2.0e1,"prompt_tokens":3}}`))
	f.Add([]byte(`{"usage":{"prompt_tokens":1,"completion_tokens"`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var u AnswerUsage
		if !parseUsage(b, &u) {
			return
		}
		i := bytes.LastIndex(b, usageKey)
		start := skipSpace(b, i+len(usageKey))
		var want struct {
			Prompt     *float64 `json:"prompt_tokens"`
			Completion *float64 `json:"completion_tokens"`
		}
		// Keys match exactly in the reader; encoding/json folds case, so
		// only bodies without folded duplicates compare.
		var raw map[string]json.RawMessage
		if err := json.Unmarshal(b[start:skipValue(b, start)], &raw); err != nil {
			t.Fatalf("read a usage object encoding/json refuses: %v", err)
		}
		for key := range raw {
			if key != "prompt_tokens" && key != "completion_tokens" && (strings.EqualFold(key, "prompt_tokens") || strings.EqualFold(key, "completion_tokens")) {
				return
			}
		}
		json.Unmarshal(b[start:skipValue(b, start)], &want)
		got := [2]int64{u.PromptTokens, u.CompletionTokens}
		var exp [2]int64
		for k, v := range [2]*float64{want.Prompt, want.Completion} {
			if v != nil {
				exp[k] = int64(*v)
			}
		}
		if got != exp {
			t.Fatalf("parseUsage read %v, encoding/json %v, from %s", got, exp, b)
		}
	})
}
