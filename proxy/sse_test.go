package proxy

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// chunkedReader returns its chunks one Read at a time, then err.
type chunkedReader struct {
	chunks []string
	err    error
}

func (r *chunkedReader) Read(p []byte) (int, error) {
	if len(r.chunks) == 0 {
		return 0, r.err
	}
	n := copy(p, r.chunks[0])
	if n < len(r.chunks[0]) {
		r.chunks[0] = r.chunks[0][n:]
	} else {
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

func (r *chunkedReader) Close() error { return nil }

const errorEvent = `data: {"error":{"message":"The upstream API failed while streaming the answer. The answer is incomplete.","type":"api_error","code":"upstream_stream_failed"}}` + "\n\n"

func TestSSEBody(t *testing.T) {
	cases := []struct {
		name   string
		chunks []string
		err    error
		want   string
	}{
		{
			name:   "whole events pass unchanged",
			chunks: []string{"data: {\"a\":1}\n\n", "data: {\"a\":2}\n\n", "data: [DONE]\n\n"},
			err:    io.EOF,
			want:   "data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n",
		},
		{
			name:   "events split across reads are joined",
			chunks: []string{"da", "ta: {\"a\":1}\n", "\nda", "ta: [DONE]\n\n"},
			err:    io.EOF,
			want:   "data: {\"a\":1}\n\ndata: [DONE]\n\n",
		},
		{
			name:   "CRLF framing",
			chunks: []string{"data: {\"a\":1}\r\n\r\n", "data: [DONE]\r\n\r\n"},
			err:    io.EOF,
			want:   "data: {\"a\":1}\r\n\r\ndata: [DONE]\r\n\r\n",
		},
		{
			name:   "comments and event fields pass",
			chunks: []string{": keep-alive\n\nevent: x\ndata: {}\n\n", "data: [DONE]\n\n"},
			err:    io.EOF,
			want:   ": keep-alive\n\nevent: x\ndata: {}\n\ndata: [DONE]\n\n",
		},
		{
			name:   "broken mid-event: torn event dropped, error event added",
			chunks: []string{"data: {\"a\":1}\n\n", "data: {\"a\":"},
			err:    errors.New("connection reset by peer"),
			want:   "data: {\"a\":1}\n\n" + errorEvent,
		},
		{
			name:   "closed without [DONE] is a failure",
			chunks: []string{"data: {\"a\":1}\n\n"},
			err:    io.EOF,
			want:   "data: {\"a\":1}\n\n" + errorEvent,
		},
		{
			name:   "closed mid-event after [DONE] is a failure",
			chunks: []string{"data: [DONE]\n\n", "data: {"},
			err:    io.EOF,
			want:   "data: [DONE]\n\n" + errorEvent,
		},
		{
			name: "nothing at all is a failure",
			err:  io.ErrUnexpectedEOF,
			want: errorEvent,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := &chunkedReader{chunks: append([]string(nil), tc.chunks...), err: tc.err}
			b := newSSEBody(context.Background(), src, zap.NewNop(), nil)
			defer b.Close()
			got, err := io.ReadAll(b)
			if err != nil {
				t.Fatalf("ReadAll: %v, want a clean end", err)
			}
			if string(got) != tc.want {
				t.Errorf("got  %q\nwant %q", got, tc.want)
			}
		})
	}
}

func TestSSEBodyPassesErrorWhenClientLeft(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	gone := errors.New("context canceled")
	b := newSSEBody(ctx, &chunkedReader{chunks: []string{"data: {}\n\n", "data: {"}, err: gone}, zap.NewNop(), nil)
	defer b.Close()
	got, err := io.ReadAll(b)
	if !errors.Is(err, gone) {
		t.Errorf("err = %v, want the read error passed on", err)
	}
	if string(got) != "data: {}\n\n" {
		t.Errorf("got %q, want only the whole event", got)
	}
}

func TestSSEBodySmallReads(t *testing.T) {
	// The reader of the body may ask for fewer bytes than an event holds.
	src := &chunkedReader{chunks: []string{"data: " + strings.Repeat("x", 100) + "\n\ndata: [DONE]\n\n"}, err: io.EOF}
	b := newSSEBody(context.Background(), src, zap.NewNop(), nil)
	defer b.Close()
	var got []byte
	p := make([]byte, 7)
	for {
		n, err := b.Read(p)
		got = append(got, p[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if want := "data: " + strings.Repeat("x", 100) + "\n\ndata: [DONE]\n\n"; string(got) != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestSSEBodyLongEventIsBounded(t *testing.T) {
	long := "data: " + strings.Repeat("y", maxEventSize+10)
	src := &chunkedReader{chunks: []string{long, "\n\ndata: [DONE]\n\n"}, err: io.EOF}
	b := newSSEBody(context.Background(), src, zap.NewNop(), nil)
	defer b.Close()
	got, err := io.ReadAll(b)
	if err != nil {
		t.Fatal(err)
	}
	if want := long + "\n\ndata: [DONE]\n\n"; string(got) != want {
		t.Errorf("an event over the bound was changed: got %d bytes, want %d", len(got), len(want))
	}
}

func TestRoute(t *testing.T) {
	cases := []struct {
		method, path string
		wantID       int
		wantStatus   int
	}{
		{"POST", "/v1/chat/completions", ChatCompletions, 0},
		{"POST", "/v1/completions", Completions, 0},
		{"GET", "/v1/models", Models, 0},
		{"POST", "/v1/embeddings", Embeddings, 0},
		{"GET", "/v1/usage", Usage, 0},
		{"GET", "/v1/chat/completions", 0, 405},
		{"POST", "/v1/usage", 0, 405},
		{"GET", "/v1/files", 0, 404},
		{"GET", "/v2/models", 0, 404},
		{"GET", "", 0, 404},
	}
	for _, tc := range cases {
		ep, err := Route(tc.method, tc.path)
		switch {
		case tc.wantStatus != 0 && (err == nil || err.Status != tc.wantStatus):
			t.Errorf("Route(%s %s) = %v, want status %d", tc.method, tc.path, err, tc.wantStatus)
		case tc.wantStatus == 0 && (err != nil || ep.ID != tc.wantID):
			t.Errorf("Route(%s %s) = %v %v, want endpoint %d", tc.method, tc.path, ep, err, tc.wantID)
		}
	}
	if _, err := Route("GET", "/"+strings.Repeat("a", 5000)); len(err.Message) > 300 {
		t.Errorf("a long path is echoed whole: %d bytes", len(err.Message))
	}
}

func TestSSEBodyTapsUsage(t *testing.T) {
	chunk := func(content string) string {
		return `data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"` + content + `"},"finish_reason":null}],"usage":null}` + "\n\n"
	}
	usageChunk := `data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}` + "\n\n"
	stream := chunk("") + chunk("Hello") + chunk(" world") + chunk("!") + usageChunk + "data: [DONE]\n\n"

	for _, strip := range []bool{false, true} {
		c := &Call{StripUsage: strip}
		u := &c.Usage
		// Split into small reads so that events straddle them.
		var chunks []string
		for s := stream; len(s) > 0; {
			n := min(37, len(s))
			chunks, s = append(chunks, s[:n]), s[n:]
		}
		b := newSSEBody(context.Background(), &chunkedReader{chunks: chunks, err: io.EOF}, zap.NewNop(), c)
		got, err := io.ReadAll(b)
		b.Close()
		if err != nil {
			t.Fatal(err)
		}
		want := stream
		if strip {
			want = strings.Replace(stream, usageChunk, "", 1)
		}
		if string(got) != want {
			t.Errorf("strip=%v: got %q\nwant %q", strip, got, want)
		}
		if !u.Reported || u.PromptTokens != 12 || u.CompletionTokens != 3 || u.Chunks != 3 {
			t.Errorf("strip=%v: usage %+v, want 12+3 reported and 3 content chunks", strip, *u)
		}
	}
}

func TestJSONTapReadsUsageAtTheEnd(t *testing.T) {
	body := `{"id":"x","choices":[{"message":{"content":"` + strings.Repeat("a", 20000) + `"}}],"usage":{"prompt_tokens":7,"completion_tokens":5000,"total_tokens":5007}}`
	u := new(AnswerUsage)
	j := &jsonTap{src: io.NopCloser(&chunkedReader{chunks: []string{body[:9000], body[9000:19000], body[19000:]}, err: io.EOF}), usage: u}
	got, err := io.ReadAll(j)
	if err != nil || string(got) != body {
		t.Fatalf("the body changed or failed: %v", err)
	}
	if !u.Reported || u.PromptTokens != 7 || u.CompletionTokens != 5000 {
		t.Errorf("usage = %+v, want 7 and 5000", *u)
	}
}

func TestParseUsage(t *testing.T) {
	cases := []struct {
		in      string
		ok      bool
		figures [4]int64 // prompt, completion, cached, reasoning
		garbled bool
	}{
		{`{"usage":{"prompt_tokens":1,"completion_tokens":2}}`, true, [4]int64{1, 2, 0, 0}, false},
		{`{"usage": {"completion_tokens": 9, "prompt_tokens": 4, "total_tokens": 13}}`, true, [4]int64{4, 9, 0, 0}, false},
		{`{"usage":{"prompt_tokens":8,"total_tokens":8}}`, true, [4]int64{8, 0, 0, 0}, false}, // embeddings
		{`{"usage":null}`, false, [4]int64{}, false},
		{`{"choices":[]}`, false, [4]int64{}, false},
		{`{"usage":{"total_tokens":8}}`, false, [4]int64{}, false},
		// Nested details, as OpenAI-compatible servers send them: read
		// as JSON, not up to the first '}', for their two counts.
		{`{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens":500}}`, true, [4]int64{10, 500, 0, 0}, false},
		{`{"usage":{"completion_tokens_details":{"reasoning_tokens":7,"completion_tokens":1},"completion_tokens":20,"prompt_tokens":3}}`, true, [4]int64{3, 20, 0, 7}, false},
		{`{"usage":{"prompt_tokens":2048,"completion_tokens":300,"total_tokens":2348,` +
			`"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":1920},` +
			`"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":256,"rejected_prediction_tokens":0}}}`,
			true, [4]int64{2048, 300, 1920, 256}, false},
		{`{"usage":{"prompt_tokens":5,"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":null}}}`, true, [4]int64{5, 0, 0, 0}, false},
		{`{"usage":{"prompt_tokens":1e6,"completion_tokens":2.0}}`, true, [4]int64{1_000_000, 2, 0, 0}, false},
		// Figures that are not counts: the usage was reported, garbled.
		{`{"usage":{"prompt_tokens":"x"}}`, true, [4]int64{}, true},
		{`{"usage":{"prompt_tokens":1.5,"completion_tokens":-2}}`, true, [4]int64{}, true},
		{`{"usage":{"prompt_tokens":9000000000000000000,"completion_tokens":5}}`, true, [4]int64{0, 5, 0, 0}, true},
		{`{"usage":{"prompt_tokens":9e18,"completion_tokens":5}}`, true, [4]int64{0, 5, 0, 0}, true},
		{`{"usage":{"prompt_tokens":3,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":-1}}}`, true, [4]int64{3, 5, 0, 0}, true},
		{`{"usage":{"prompt_tokens":3,"completion_tokens":5,"completion_tokens_details":7}}`, true, [4]int64{3, 5, 0, 0}, true},
		{`{"usage":{"prompt_tokens":10,"completion_tok`, false, [4]int64{}, false}, // cut short
	}
	for _, tc := range cases {
		var u AnswerUsage
		ok := parseUsage([]byte(tc.in), &u)
		got := [4]int64{u.PromptTokens, u.CompletionTokens, u.CachedTokens, u.ReasoningTokens}
		if ok != tc.ok || got != tc.figures || (u.Garbled != "") != tc.garbled || u.Reported != tc.ok {
			t.Errorf("parseUsage(%s) = %v %v garbled %q, want %v %v garbled %v", tc.in, ok, got, u.Garbled, tc.ok, tc.figures, tc.garbled)
		}
	}
	// A usage object read whole after a garbled one clears it.
	var u AnswerUsage
	parseUsage([]byte(`{"usage":{"prompt_tokens":-1}}`), &u)
	if parseUsage([]byte(`{"usage":{"prompt_tokens":1}}`), &u); u.Garbled != "" {
		t.Errorf("garbled %q after a good usage object", u.Garbled)
	}
}
