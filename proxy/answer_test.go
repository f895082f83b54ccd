package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

func TestReadAnswer(t *testing.T) {
	usage := `,"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}`
	small := `{"id":"x","choices":[]` + usage
	big := `{"id":"x","data":"` + strings.Repeat("a", maxCheckedAnswer) + `"` + usage
	reset := syscall.ECONNRESET
	for _, tc := range []struct {
		name    string
		chunks  []string
		err     error // after the chunks
		want    string
		wantErr error
	}{
		{"whole answer", []string{small[:10], small[10:]}, io.EOF, small, nil},
		{"not JSON", []string{"<html>oops</html>"}, io.EOF, "", errBadAnswer},
		{"truncated JSON", []string{small[:20]}, io.EOF, "", errBadAnswer},
		{"broken off", []string{small[:20]}, reset, "", reset},
		{"larger than checked passes unchecked", []string{big[:1000], big[1000:]}, io.EOF, big, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := new(AnswerUsage)
			res := &http.Response{Body: &chunkedReader{chunks: append([]string(nil), tc.chunks...), err: tc.err}, ContentLength: -1}
			body, err := readAnswer(res, u, new(checkedAnswer), 1<<30)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error = %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			got, err := io.ReadAll(body)
			body.Close()
			if err != nil || string(got) != tc.want {
				t.Fatalf("read %d bytes (%v), want the %d of the answer", len(got), err, len(tc.want))
			}
			if !u.Reported || u.PromptTokens != 7 || u.CompletionTokens != 5 {
				t.Errorf("usage = %+v, want 7 and 5", *u)
			}
		})
	}
}

func TestIsEventStream(t *testing.T) {
	for ct, want := range map[string]bool{
		"text/event-stream": true, "text/event-stream; charset=utf-8": true, "Text/Event-Stream": true,
		"text/event-stream ;charset=utf-8": true, "application/json": false, "text/event-streams": false,
		"text/event-stream-x; a=b": false, "": false, "text/event": false,
	} {
		if got := isEventStream(ct); got != want {
			t.Errorf("isEventStream(%q) = %v, want %v", ct, got, want)
		}
	}
}

// blockingReader blocks in Read until release, then returns data.
type blockingReader struct{ release chan struct{} }

func (r *blockingReader) Read(p []byte) (int, error) {
	<-r.release
	return copy(p, "data: x\n\n"), nil
}

func (r *blockingReader) Close() error { return nil }

func TestIdleBodyCountsOnlyTheWaitInRead(t *testing.T) {
	const timeout = 50 * time.Millisecond
	ctx, cancel := context.WithCancelCause(context.Background())
	src := &blockingReader{release: make(chan struct{}, 1)}
	b := newIdleBody(src, cancel, timeout)
	defer b.Close()

	// A slow reader: long pauses between Reads, each Read answered at once.
	for range 3 {
		time.Sleep(2 * timeout)
		src.release <- struct{}{}
		if _, err := b.Read(make([]byte, 64)); err != nil {
			t.Fatalf("a Read after a pause of the caller failed: %v", err)
		}
	}
	if ctx.Err() != nil {
		t.Fatal("the caller's pauses were taken for the upstream's silence")
	}
	// The upstream silent in a Read: cut with errIdle.
	done := make(chan error, 1)
	go func() { _, err := b.Read(make([]byte, 64)); done <- err }()
	deadline := time.After(5 * time.Second)
	for context.Cause(ctx) != errIdle {
		select {
		case <-deadline:
			t.Fatal("a silent upstream was not cut")
		case <-time.After(time.Millisecond):
		}
	}
	src.release <- struct{}{} // the stand-in reader does not watch the context
	if err := <-done; err != errIdle && err != nil {
		t.Errorf("Read error = %v, want errIdle or none", err)
	}
}

// TestAnswersHeldAreBounded: JSON answers read whole hold at most the
// process's bound between them; past it an answer passes as it comes,
// its usage still read from its end, and every byte is given back.
func TestAnswersHeldAreBounded(t *testing.T) {
	answer := `{"padding":"` + strings.Repeat("x", 200<<10) + `","usage":{"prompt_tokens":3,"completion_tokens":5}}`
	before := wire.Held()
	limit := before + 300<<10
	var bodies []io.ReadCloser
	passed := 0
	for range 4 {
		res := &http.Response{StatusCode: 200, Body: io.NopCloser(strings.NewReader(answer)), ContentLength: int64(len(answer))}
		u := new(AnswerUsage)
		body, err := readAnswer(res, u, new(checkedAnswer), limit)
		if err != nil {
			t.Fatal(err)
		}
		if wire.Held() > limit {
			t.Errorf("answers hold %d bytes, over the bound of %d", wire.Held()-before, limit-before)
		}
		if _, whole := body.(*checkedAnswer); !whole {
			passed++
			got, _ := io.ReadAll(body)
			if string(got) != answer || !u.Reported || u.CompletionTokens != 5 {
				t.Errorf("an answer passed as it came: %d bytes, usage %+v", len(got), u)
			}
		}
		bodies = append(bodies, body)
	}
	if passed != 3 {
		t.Errorf("%d of 4 answers passed unchecked, want 3", passed)
	}
	for _, b := range bodies {
		b.Close()
	}
	if got := wire.Held(); got != before {
		t.Errorf("%d bytes held after, want %d", got-before, 0)
	}
}
