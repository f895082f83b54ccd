package proxy

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
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
			body, err := readAnswer(res, u)
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
