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
		u := new(AnswerUsage)
		b := newSSEBody(context.Background(), &chunkedReader{chunks: chunks, err: io.EOF}, zap.NewNop(), &tap{usage: u, stripUsage: strip})
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
	for _, s := range []string{`{"model":"m","stream":true}`, `{"stream_options":null,"max_tokens":null}`, `{"stream_options":{}}`, `[]`, `{"n":3,"max_tokens":5}`, `{} `, "{\"a\":\"\\u0000\"}"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		info, apiErr := ParseRequest(body)
		if apiErr != nil {
			return
		}
		withUsage, err := WithStreamUsage(body, info)
		if err != nil {
			return
		}
		var got struct {
			StreamOptions struct {
				IncludeUsage bool `json:"include_usage"`
			} `json:"stream_options"`
		}
		if err := json.Unmarshal(withUsage, &got); err != nil || !got.StreamOptions.IncludeUsage {
			t.Errorf("WithStreamUsage(%q) = %q (%v): not JSON asking for usage", body, withUsage, err)
		}
		capped, err := SetMaxTokens(body, info, 7)
		if err != nil {
			return
		}
		var mt struct {
			MaxTokens int64 `json:"max_tokens"`
		}
		if err := json.Unmarshal(capped, &mt); err != nil || mt.MaxTokens != 7 {
			t.Errorf("SetMaxTokens(%q) = %q (%v): max_tokens is not 7", body, capped, err)
		}
	})
}
