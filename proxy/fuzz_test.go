package proxy

import (
	"bytes"
	"context"
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
