package wire

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
)

func FuzzRequestEdits(f *testing.F) {
	for _, s := range []string{`{"model":"m","stream":true}`, `{"stream_options":null,"max_tokens":null}`, `{"stream_options":{}}`, `[]`,
		`{"n":3,"max_tokens":5}`, `{} `, "{\"a\":\"\\u0000\"}", `{"Model":"a","model":"b","MAX_TOKENS":1}`,
		`{"mod\u0065l":"x","max_completion_tokens":9}`, `{"model":"a","model":"b"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		info, err := ParseRequest(body)
		if err != nil {
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
		for _, field := range []string{MaxTokensField, MaxCompletionTokensField} {
			capped, err := SetCap(body, info, field, 7)
			if err != nil {
				return
			}
			if got := exactFields(t, capped)[field]; string(got) != "7" {
				t.Errorf("SetCap(%q, %s) = %q: %s is %s, not 7", body, field, capped, field, got)
			}
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
		info, err := ParseRequest(body)
		if err != nil {
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
// five figures (prompt, completion and total tokens, and the cached and
// reasoning tokens of their details), and the same of the first three
// given, whatever the key order, nesting and number spelling; and the
// reader finds it garbled exactly when
// encoding/json fails on it or decodes a figure that is not a count.
func FuzzParseUsage(f *testing.F) {
	f.Add([]byte(`{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens":500}}`))
	f.Add([]byte(`data: {"choices":[],"usage":{"completion_tokens":2.0e1,"prompt_tokens":3,"completion_tokens_details":{"reasoning_tokens":4}}}`))
	f.Add([]byte(`{"usage":{"prompt_tokens":1,"completion_tokens"`))
	f.Add([]byte(`{"usage":{"prompt_tokens":-1,"prompt_tokens":1e400,"prompt_tokens_details":5,"completion_tokens":9e18}}`))
	f.Add([]byte(`{"usage":{"prompt_tokens":1.5,"prompt_tokens":2,"prompt_tokens_details":{"cached_tokens":1},"prompt_tokens_details":null}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		u, ok := ParseUsage(b)
		if !ok {
			return
		}
		i := bytes.LastIndex(b, UsageKey)
		start := skipSpace(b, i+len(UsageKey))
		obj := b[start:skipValue(b, start)]
		// Keys match exactly in the reader; encoding/json folds case, so
		// only objects without folded spellings of the keys compare.
		if spellsFolded(obj, "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "completion_tokens_details", "cached_tokens", "reasoning_tokens") {
			return
		}
		var want struct {
			Prompt        *float64 `json:"prompt_tokens"`
			Completion    *float64 `json:"completion_tokens"`
			Total         *float64 `json:"total_tokens"`
			PromptDetails *struct {
				Cached *float64 `json:"cached_tokens"`
			} `json:"prompt_tokens_details"`
			CompletionDetails *struct {
				Reasoning *float64 `json:"reasoning_tokens"`
			} `json:"completion_tokens_details"`
		}
		garbled := json.Unmarshal(obj, &want) != nil
		figures := [5]*float64{want.Prompt, want.Completion, nil, nil, want.Total}
		if want.PromptDetails != nil {
			figures[2] = want.PromptDetails.Cached
		}
		if want.CompletionDetails != nil {
			figures[3] = want.CompletionDetails.Reasoning
		}
		var exp [5]int64
		for k, v := range figures {
			switch {
			case v == nil:
			case *v < 0 || *v > maxReportedTokens || *v != math.Trunc(*v):
				garbled = true
			default:
				exp[k] = int64(*v)
			}
		}
		if (u.Garbled != "") != garbled {
			t.Fatalf("ParseUsage found %s garbled: %v, encoding/json: %v", obj, u.Garbled != "", garbled)
		}
		if got := [5]int64{u.Prompt, u.Completion, u.Cached, u.Reasoning, u.Total}; !garbled && got != exp {
			t.Fatalf("ParseUsage read %v, encoding/json %v, from %s", got, exp, obj)
		}
		if given := [3]bool{u.HasPrompt, u.HasCompletion, u.HasTotal}; !garbled && given != [3]bool{want.Prompt != nil, want.Completion != nil, want.Total != nil} {
			t.Fatalf("ParseUsage found figures %v given in %s", given, obj)
		}
	})
}

// spellsFolded reports whether a key of the JSON object obj, or of an object
// within it, folds to one of names without being it.
func spellsFolded(obj []byte, names ...string) bool {
	var members map[string]json.RawMessage
	if json.Unmarshal(obj, &members) != nil {
		return false // not an object
	}
	for key, v := range members {
		for _, name := range names {
			if key != name && strings.EqualFold(key, name) {
				return true
			}
		}
		if spellsFolded(v, names...) {
			return true
		}
	}
	return false
}
