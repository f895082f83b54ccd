package proxy

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"testing/iotest"
)

// TestReadBodyLimits checks what ReadBody accepts and refuses, and that the
// process budget is given back whatever happened.
func TestReadBodyLimits(t *testing.T) {
	lim := &BodyLimits{Size: 100_000, MaxBuffered: 1 << 20}
	cases := []struct {
		name   string
		body   io.Reader
		length int64 // Content-Length; -1 unknown
		status int   // 0: accepted
	}{
		{name: "small", body: strings.NewReader(`{"a":1}`), length: 7},
		{name: "exactly the limit", body: bytes.NewReader(make([]byte, 100_000)), length: -1},
		{name: "one over, length unknown", body: bytes.NewReader(make([]byte, 100_001)), length: -1},
		{name: "over, announced", body: strings.NewReader("x"), length: 100_001, status: http.StatusRequestEntityTooLarge},
		{name: "truncated", body: io.MultiReader(strings.NewReader("abc"), iotest.ErrReader(io.ErrUnexpectedEOF)), length: 10, status: http.StatusBadRequest},
		{name: "read error", body: iotest.ErrReader(io.ErrClosedPipe), length: -1, status: http.StatusBadRequest},
		{name: "one byte at a time", body: iotest.OneByteReader(strings.NewReader(strings.Repeat("y", 20_000))), length: -1},
	}
	cases[2].status = http.StatusRequestEntityTooLarge
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest("POST", "/v1/chat/completions", tc.body)
			r.ContentLength = tc.length
			w := httptest.NewRecorder()
			body, apiErr := ReadBody(w, r, lim)
			defer body.Release()
			switch {
			case tc.status == 0 && apiErr != nil:
				t.Fatalf("refused with %d %s", apiErr.Status, apiErr.Code)
			case tc.status != 0 && apiErr == nil:
				t.Fatalf("accepted %d bytes, want %d", len(body.Bytes()), tc.status)
			case tc.status != 0 && apiErr.Status != tc.status:
				t.Fatalf("status %d, want %d", apiErr.Status, tc.status)
			case tc.status != 0 && w.Header().Get("Connection") != "close":
				t.Error("a refused body that was not read whole leaves the connection open")
			}
			if apiErr == nil {
				replay, _ := io.ReadAll(r.Body)
				if !bytes.Equal(replay, body.Bytes()) || r.ContentLength != int64(len(replay)) {
					t.Error("r.Body does not replay the body read")
				}
				body.Release()
			}
			if n := BufferedBytes(); n != 0 {
				t.Errorf("%d bytes still counted as buffered", n)
			}
		})
	}
}

// TestReadBodyGrowsWithArrivals checks that what a body holds follows the
// bytes that arrived, not the length it announced.
func TestReadBodyGrowsWithArrivals(t *testing.T) {
	lim := &BodyLimits{Size: 10_000_000, MaxBuffered: 64 << 20}
	// A reader that notes what is held when asked for more, and then
	// ends as a connection that sent nothing does.
	var held int64
	src := readerFunc(func(p []byte) (int, error) {
		held = max(held, BufferedBytes())
		return 0, io.ErrUnexpectedEOF
	})
	r := httptest.NewRequest("POST", "/v1/chat/completions", src)
	r.ContentLength = 10_000_000 // announced, never sent
	body, apiErr := ReadBody(httptest.NewRecorder(), r, lim)
	body.Release()
	if apiErr == nil || apiErr.Status != http.StatusBadRequest {
		t.Fatalf("got %v, want a 400 for a body shorter than announced", apiErr)
	}
	if held > firstBodyChunk*32 {
		t.Errorf("%d bytes held for a body that sent nothing, want at most %d", held, firstBodyChunk*32)
	}
}

// TestReadBodyBudget checks that bodies in flight share the process budget:
// past it, a new body is refused with 503 and Retry-After, and the budget
// comes back when bodies are released.
func TestReadBodyBudget(t *testing.T) {
	lim := &BodyLimits{Size: 1_000_000, MaxBuffered: 1_000_000}
	// Nearly the whole budget, whatever size of buffer the pool starts it in.
	first := httptest.NewRequest("POST", "/", bytes.NewReader(make([]byte, 999_000)))
	held, apiErr := ReadBody(httptest.NewRecorder(), first, lim)
	if apiErr != nil {
		t.Fatalf("first body refused: %s", apiErr.Code)
	}
	w := httptest.NewRecorder()
	_, apiErr = ReadBody(w, httptest.NewRequest("POST", "/", strings.NewReader("{}")), lim)
	if apiErr == nil || apiErr.Status != http.StatusServiceUnavailable || w.Header().Get("Retry-After") == "" {
		t.Fatalf("got %v with Retry-After %q, want 503 with Retry-After", apiErr, w.Header().Get("Retry-After"))
	}
	held.Release()
	second, apiErr := ReadBody(httptest.NewRecorder(), httptest.NewRequest("POST", "/", strings.NewReader("{}")), lim)
	if apiErr != nil {
		t.Fatalf("after release: %s", apiErr.Code)
	}
	second.Release()
	if n := BufferedBytes(); n != 0 {
		t.Errorf("%d bytes still counted as buffered", n)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// BenchmarkReadBody reads a small chat body, as most requests carry,
// and gives its memory back: the accounting of the body budget is on
// this path.
func BenchmarkReadBody(b *testing.B) {
	lim := &BodyLimits{Size: 10_000_000, MaxBuffered: 64 << 20}
	chat := []byte(`{"model":"vigthoria-fast-1","max_tokens":16,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}`)
	src := new(replay)
	r := httptest.NewRequest("POST", "/v1/chat/completions", nil)
	w := httptest.NewRecorder()
	b.ReportAllocs()
	for b.Loop() {
		src.Reset(chat)
		r.Body, r.ContentLength = src, int64(len(chat))
		body, apiErr := ReadBody(w, r, lim)
		if apiErr != nil {
			b.Fatal(apiErr.Message)
		}
		body.Release()
	}
}

// replay is a request body that can be reused without an allocation.
type replay struct{ bytes.Reader }

func (*replay) Close() error { return nil }
