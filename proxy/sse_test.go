package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
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
			b := newSSEBody(context.Background(), src, zap.NewNop(), nil, 1<<30)
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
	b := newSSEBody(ctx, &chunkedReader{chunks: []string{"data: {}\n\n", "data: {"}, err: gone}, zap.NewNop(), nil, 1<<30)
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
	b := newSSEBody(context.Background(), src, zap.NewNop(), nil, 1<<30)
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

func TestSSEBodyLongEventEndsTheStream(t *testing.T) {
	long := "data: " + strings.Repeat("y", wire.MaxEventSize+10)
	src := &chunkedReader{chunks: []string{"data: {}\n\n", long, "\n\ndata: [DONE]\n\n"}, err: io.EOF}
	b := newSSEBody(context.Background(), src, zap.NewNop(), nil, 1<<30)
	defer b.Close()
	got, err := io.ReadAll(b)
	if err != nil {
		t.Fatal(err)
	}
	if want := "data: {}\n\n" + string(sseEvent(errUpstreamStream)); string(got) != want {
		t.Errorf("an event over the bound: got %.200q, want %q", got, want)
	}
}

func TestRoute(t *testing.T) {
	cases := []struct {
		method, path string
		wantID       int
		wantStatus   int
	}{
		{"POST", "/v1/chat/completions", api.ChatCompletions, 0},
		{"POST", "/v1/completions", api.Completions, 0},
		{"GET", "/v1/models", api.Models, 0},
		{"POST", "/v1/embeddings", api.Embeddings, 0},
		{"GET", "/v1/usage", api.Usage, 0},
		{"GET", "/v1/chat/completions", 0, 405},
		{"POST", "/v1/usage", 0, 405},
		{"GET", "/v1/files", 0, 404},
		{"GET", "/v2/models", 0, 404},
		{"GET", "", 0, 404},
	}
	for _, tc := range cases {
		ep, err := api.Route(tc.method, tc.path)
		switch {
		case tc.wantStatus != 0 && (err == nil || err.Status != tc.wantStatus):
			t.Errorf("Route(%s %s) = %v, want status %d", tc.method, tc.path, err, tc.wantStatus)
		case tc.wantStatus == 0 && (err != nil || ep.ID != tc.wantID):
			t.Errorf("Route(%s %s) = %v %v, want endpoint %d", tc.method, tc.path, ep, err, tc.wantID)
		}
	}
	if _, err := api.Route("GET", "/"+strings.Repeat("a", 5000)); len(err.Message) > 300 {
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
		b := newSSEBody(context.Background(), &chunkedReader{chunks: chunks, err: io.EOF}, zap.NewNop(), c, 1<<30)
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

// TestParseUsageClearsGarbled: a usage object read whole after a garbled
// one clears what the garbled one left.
func TestParseUsageClearsGarbled(t *testing.T) {
	var u AnswerUsage
	parseUsage([]byte(`{"usage":{"prompt_tokens":-1}}`), &u)
	if parseUsage([]byte(`{"usage":{"prompt_tokens":1}}`), &u); u.Garbled != "" || u.PromptTokens != 1 {
		t.Errorf("usage %+v after a good usage object, want 1 prompt token and nothing garbled", u)
	}
}

// TestCutStreamCountsToolCalls: a stream of tool call deltas cut before
// its usage chunk is counted.
func TestCutStreamCountsToolCalls(t *testing.T) {
	ev := `data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ab"}}]},"finish_reason":null}]}` + "\n\n"
	c := new(Call)
	b := newSSEBody(context.Background(), &chunkedReader{chunks: []string{strings.Repeat(ev, 400)}, err: io.ErrUnexpectedEOF}, zap.NewNop(), c, 1<<30)
	io.Copy(io.Discard, b)
	b.Close()
	if c.Usage.Chunks != 400 {
		t.Errorf("400 tool call chunks counted as %d tokens", c.Usage.Chunks)
	}
}

// TestClosedEarlyReadsTheRest: an answer closed before its end, as the
// reverse proxy closes it when the caller left, is read to its end first,
// for the usage the upstream bills by: a stream's last chunk, a large
// JSON answer's tail.
func TestClosedEarlyReadsTheRest(t *testing.T) {
	chunk := `data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}` + "\n\n"
	usage := `data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":5000,"completion_tokens":3,"total_tokens":5003}}` + "\n\n"
	c := new(Call)
	gone, leave := context.WithCancel(context.Background())
	b := newSSEBody(gone, &chunkedReader{chunks: []string{chunk, chunk, chunk, usage, "data: [DONE]\n\n"}, err: io.EOF}, zap.NewNop(), c, 1<<30)
	if _, err := b.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	leave()
	b.Close()
	if u := &c.Usage; !u.Reported || u.PromptTokens != 5000 || u.CompletionTokens != 3 || u.Chunks != 3 {
		t.Errorf("a stream closed after its first event: usage %+v, want the upstream's 5000 + 3 and 3 chunks", *u)
	}

	body := `{"id":"x","choices":[{"message":{"content":"` + strings.Repeat("a", 20000) + `"}}],"usage":{"prompt_tokens":7,"completion_tokens":5000,"total_tokens":5007}}`
	u := new(AnswerUsage)
	j := &jsonTap{src: io.NopCloser(&chunkedReader{chunks: []string{body[:9000], body[9000:19000], body[19000:]}, err: io.EOF}), usage: u}
	if _, err := j.Read(make([]byte, 100)); err != nil {
		t.Fatal(err)
	}
	j.Close()
	if !u.Reported || u.PromptTokens != 7 || u.CompletionTokens != 5000 || u.Bytes != int64(len(body)) {
		t.Errorf("a JSON answer closed after 100 bytes: usage %+v, want 7 and 5000 of %d bytes", *u, len(body))
	}
}

// TestCallerWhoHangsUpAfterTheEndDidNotLeave: a stream the upstream broke
// off ends with an error event, on which the SDKs hang up, and a whole
// one with [DONE]; the caller had its whole answer, and is charged what
// was streamed, not the bound of a caller who left early. A caller who
// left before the end did leave.
func TestCallerWhoHangsUpAfterTheEndDidNotLeave(t *testing.T) {
	for _, tc := range []struct {
		end       string
		leftFirst bool
	}{{"broke", false}, {"broke", true}, {"done", false}, {"done", true}} {
		leftFirst := tc.leftFirst
		ctx, hangUp := context.WithCancel(context.Background())
		c := &Call{logger: zap.NewNop()}
		c.Usage.Watch(ctx)
		c.Usage.MarkSent(true)
		if leftFirst {
			hangUp()
		}
		if tc.end == "broke" {
			(*callTap)(c).Broke(io.ErrUnexpectedEOF)
		} else {
			(*callTap)(c).Done()
		}
		hangUp()
		if got := c.Usage.CallerLeft(); got != leftFirst {
			t.Errorf("stream %s, caller left before the end: %v; CallerLeft() = %v, want %v", tc.end, leftFirst, got, leftFirst)
		}
		if !c.Usage.Sent() {
			t.Error("noting the end lost the request's sent mark")
		}
	}
}

// TestCallerWhoHangsUpAfterAWholeAnswerDidNotLeave: a JSON answer is read
// whole before the caller has a byte of it; a caller who hangs up once it
// has it did not leave early.
func TestCallerWhoHangsUpAfterAWholeAnswerDidNotLeave(t *testing.T) {
	ctx, hangUp := context.WithCancel(context.Background())
	var u AnswerUsage
	u.Watch(ctx)
	body := `{"id":"x","choices":[]}`
	res := &http.Response{StatusCode: http.StatusOK, Header: http.Header{}, ContentLength: int64(len(body)),
		Body: io.NopCloser(strings.NewReader(body))}
	var into checkedAnswer
	rc, err := readAnswer(res, &u, &into, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	hangUp()
	rc.Close()
	if u.CallerLeft() {
		t.Error("a caller that hung up after its whole answer was read counts as one who left early")
	}
}
