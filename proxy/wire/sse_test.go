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
func (usageStripper) Done()              {}
func (usageStripper) Broke(error) []byte { return brokenEvent }

var brokenEvent = []byte("data: {\"error\":{\"message\":\"broken\"}}\n\n")

func FuzzSSEBody(f *testing.F) {
	f.Add([]byte("data: {\"a\":1}\n\ndata: [DONE]\n\n"), uint8(7), true)
	f.Add([]byte("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n"), uint8(3), true)
	f.Add([]byte("data: {\"a\":"), uint8(1), false)
	f.Add([]byte(": comment\r\n\r\nevent: x\ndata: y\n\n"), uint8(200), false)
	f.Add([]byte("data: {\"a\":1}\r\rdata: {\"b\":2}\rdata: {\"c\":3}\r\rdata: [DONE]\r\r"), uint8(1), false)
	f.Add([]byte("data: {\"a\":1}\r\n\rdata: {\"b\":2}\r\r\ndata: [DONE]\r\n\r\n"), uint8(9), false)
	f.Add([]byte("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\rdata: [DONE]\r\r"), uint8(5), true)
	f.Fuzz(func(t *testing.T, stream []byte, chunk uint8, strip bool) {
		size := int(chunk%64) + 1
		var chunks []io.Reader
		for s := string(stream); len(s) > 0; {
			n := min(size, len(s))
			chunks, s = append(chunks, strings.NewReader(s[:n])), s[n:]
		}
		// A MultiReader reads one chunk a Read.
		b := NewSSE(context.Background(), io.NopCloser(io.MultiReader(chunks...)), usageStripper{strip}, 1<<30)
		out, err := io.ReadAll(b)
		b.Close()
		if err != nil {
			t.Fatalf("the body ended with %v, want a clean end", err)
		}
		// Lines may end with CRLF, LF or CR: the same stream, read so.
		in, got := lines(stream), lines(out)
		// The stream's last event is data: [DONE], on a line of its own.
		complete := bytes.Equal(in, []byte("data: [DONE]\n\n")) || bytes.HasSuffix(in, []byte("\n\ndata: [DONE]\n\n"))
		switch {
		case bytes.HasSuffix(out, brokenEvent):
			if complete && !strip && bytes.Count(stream, []byte("[DONE]")) == 1 {
				t.Errorf("a complete stream was ended as broken:\n%q", stream)
			}
		case bytes.Contains(out, []byte("\r")) && bytes.Contains(bytes.ReplaceAll(out, []byte("\r\n"), nil), []byte("\r")):
			t.Errorf("a CR alone was passed on:\n in %q\nout %q", stream, out)
		case !strip && !bytes.Equal(got, in):
			t.Errorf("the stream changed:\n in %q\nout %q", stream, out)
		}
	})
}

// lines writes every line end of b as LF.
func lines(b []byte) []byte {
	return bytes.ReplaceAll(bytes.ReplaceAll(b, []byte("\r\n"), []byte("\n")), []byte("\r"), []byte("\n"))
}

// brokeWith is a tap that remembers why its stream broke.
type brokeWith struct{ err error }

func (*brokeWith) Event([]byte) bool { return false }
func (*brokeWith) Ready()            {}
func (*brokeWith) Done()             {}
func (b *brokeWith) Broke(err error) []byte {
	b.err = err
	return brokenEvent
}

func TestSSEBounds(t *testing.T) {
	event := func(n int) string { return "data: " + strings.Repeat("y", n) + "\n\n" }
	for _, tc := range []struct {
		name   string
		stream string
		limit  int64
		want   error
	}{
		{"an event of a MiB", event(MaxEventSize-8) + "data: [DONE]\n\n", 1 << 30, nil},
		{"an event over a MiB", event(MaxEventSize) + "data: [DONE]\n\n", 1 << 30, ErrEventTooLarge},
		{"no room in the process", event(64<<10) + "data: [DONE]\n\n", 32 << 10, ErrAnswersBusy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := Held()
			tap := new(brokeWith)
			b := NewSSE(context.Background(), io.NopCloser(strings.NewReader(tc.stream)), tap, tc.limit+before)
			out, err := io.ReadAll(b)
			if err != nil || tap.err != tc.want {
				t.Errorf("ended with %v, broke with %v; want a clean end, broken with %v", err, tap.err, tc.want)
			}
			if tc.want == nil && string(out) != tc.stream {
				t.Errorf("the stream changed: %d bytes out, %d in", len(out), len(tc.stream))
			}
			if tc.want != nil && string(out) != string(brokenEvent) {
				t.Errorf("out %.60q, want the broken event alone", out)
			}
			if Held() <= before {
				t.Error("the body's buffer is not counted")
			}
			b.Close()
			if got := Held(); got != before {
				t.Errorf("%d bytes held after Close, want %d", got, before)
			}
		})
	}
}

func TestSSELinesEndingWithCR(t *testing.T) {
	in := "data: {\"a\":1}\r\rdata: {\"b\":2}\rdata: x\r\n\r\ndata: [DONE]\r\r"
	want := "data: {\"a\":1}\n\ndata: {\"b\":2}\ndata: x\r\n\r\ndata: [DONE]\n\n"
	for size := 1; size <= len(in); size++ {
		var events []string
		tap := tapFunc(func(ev []byte) { events = append(events, string(ev)) })
		var chunks []io.Reader
		for s := in; len(s) > 0; {
			n := min(size, len(s))
			chunks, s = append(chunks, strings.NewReader(s[:n])), s[n:]
		}
		b := NewSSE(context.Background(), io.NopCloser(io.MultiReader(chunks...)), tap, 1<<30)
		out, err := io.ReadAll(b)
		b.Close()
		if err != nil || string(lines(out)) != string(lines([]byte(want))) || strings.Contains(strings.ReplaceAll(string(out), "\r\n", ""), "\r") {
			t.Fatalf("read %d bytes at a time: %v, out %q, want %q", size, err, out, want)
		}
		if len(events) != 2 { // and [DONE]
			t.Fatalf("read %d bytes at a time: events %q, want 2", size, events)
		}
	}
}

type tapFunc func(ev []byte)

func (f tapFunc) Event(ev []byte) bool { f(ev); return false }
func (tapFunc) Ready()                 {}
func (tapFunc) Done()                  {}
func (tapFunc) Broke(error) []byte     { return brokenEvent }
