package wire

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
)

// usageStripper is a tap that drops a stream's usage-only chunk when
// strip is set, as the proxy's does for a client that did not ask for
// usage, and ends a broken stream with brokenEvent.
type usageStripper struct{ strip bool }

func (u usageStripper) Event(ev []byte) bool {
	_, usage := ParseUsage(ev)
	return u.strip && usage && bytes.Contains(ev, []byte(`"choices":[]`))
}
func (usageStripper) Ready()             {}
func (usageStripper) Broke(error) []byte { return brokenEvent }

var brokenEvent = []byte("data: {\"error\":{\"message\":\"broken\"}}\n\n")

func FuzzSSEBody(f *testing.F) {
	f.Add([]byte("data: {\"a\":1}\n\ndata: [DONE]\n\n"), uint8(7), true)
	f.Add([]byte("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n"), uint8(3), true)
	f.Add([]byte("data: {\"a\":"), uint8(1), false)
	f.Add([]byte(": comment\r\n\r\nevent: x\ndata: y\n\n"), uint8(200), false)
	f.Fuzz(func(t *testing.T, stream []byte, chunk uint8, strip bool) {
		size := int(chunk%64) + 1
		var chunks []io.Reader
		for s := string(stream); len(s) > 0; {
			n := min(size, len(s))
			chunks, s = append(chunks, strings.NewReader(s[:n])), s[n:]
		}
		// A MultiReader reads one chunk a Read.
		b := NewSSE(context.Background(), io.NopCloser(io.MultiReader(chunks...)), usageStripper{strip})
		out, err := io.ReadAll(b)
		b.Close()
		if err != nil {
			t.Fatalf("the body ended with %v, want a clean end", err)
		}
		// The stream's last event is data: [DONE], on a line of its own.
		complete := bytes.Equal(stream, []byte("data: [DONE]\n\n")) || bytes.HasSuffix(stream, []byte("\n\ndata: [DONE]\n\n"))
		switch {
		case bytes.HasSuffix(out, brokenEvent):
			if complete && !strip && bytes.Count(stream, []byte("[DONE]")) == 1 && !bytes.Contains(stream, []byte("\r")) {
				t.Errorf("a complete stream was ended as broken:\n%q", stream)
			}
		case !strip && !bytes.Equal(out, stream):
			t.Errorf("the stream changed:\n in %q\nout %q", stream, out)
		}
	})
}
