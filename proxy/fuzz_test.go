package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
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
