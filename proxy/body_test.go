package proxy

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"

	"github.com/vigthoria/caddy-vigthoria/api"
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
			body, apiErr := ReadBody(w, r, lim, Holder{})
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
	body, apiErr := ReadBody(httptest.NewRecorder(), r, lim, Holder{})
	body.Release()
	if apiErr == nil || apiErr.Status != http.StatusBadRequest {
		t.Fatalf("got %v, want a 400 for a body shorter than announced", apiErr)
	}
	if held > firstBodyChunk {
		t.Errorf("%d bytes held for a body that sent nothing, want at most %d", held, firstBodyChunk)
	}
}

// TestReadBodyBudget checks that bodies in flight share the process budget:
// past it, a new body is refused with 503 and Retry-After, and the budget
// comes back when bodies are released.
func TestReadBodyBudget(t *testing.T) {
	lim := &BodyLimits{Size: 1_000_000, MaxBuffered: 1_000_000}
	// Nearly the whole budget, whatever size of buffer the pool starts it in.
	first := httptest.NewRequest("POST", "/", bytes.NewReader(make([]byte, 999_000)))
	held, apiErr := ReadBody(httptest.NewRecorder(), first, lim, Holder{})
	if apiErr != nil {
		t.Fatalf("first body refused: %s", apiErr.Code)
	}
	w := httptest.NewRecorder()
	_, apiErr = ReadBody(w, httptest.NewRequest("POST", "/", strings.NewReader("{}")), lim, Holder{})
	if apiErr == nil || apiErr.Status != http.StatusServiceUnavailable || w.Header().Get("Retry-After") == "" {
		t.Fatalf("got %v with Retry-After %q, want 503 with Retry-After", apiErr, w.Header().Get("Retry-After"))
	}
	held.Release()
	second, apiErr := ReadBody(httptest.NewRecorder(), httptest.NewRequest("POST", "/", strings.NewReader("{}")), lim, Holder{})
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

// TestReadBodyShares checks that a tier's bodies hold at most its share
// and one caller's at most its ceiling, whatever the others hold, and
// that callers are forgotten once they hold nothing.
func TestReadBodyShares(t *testing.T) {
	lim := &BodyLimits{Size: 64 << 10, MaxBuffered: 1 << 20}
	callers := NewCallers()
	anonymous := callers.Share(64<<10, 64<<10)
	pro := callers.Share(512<<10, 128<<10)
	read := func(s *Share, caller string, size int) (Body, *api.Error, http.Header) {
		t.Helper()
		w := httptest.NewRecorder()
		r := httptest.NewRequest("POST", "/", bytes.NewReader(make([]byte, size)))
		body, apiErr := ReadBody(w, r, lim, Holder{Share: s, Caller: caller})
		return body, apiErr, w.Header()
	}
	wantBusy := func(apiErr *api.Error, h http.Header, want *api.Error) {
		t.Helper()
		if apiErr != want || h.Get("Retry-After") != "1" {
			t.Errorf("got %v with Retry-After %q, want %q with Retry-After 1", apiErr, h.Get("Retry-After"), want.Message)
		}
	}
	var held []Body
	keep := func(b Body, apiErr *api.Error, _ http.Header) {
		t.Helper()
		if apiErr != nil {
			t.Fatalf("refused: %s", apiErr.Message)
		}
		held = append(held, b)
	}

	keep(read(anonymous, "ip:a", 40_000)) // 64 KiB: the whole share
	_, apiErr, h := read(anonymous, "ip:b", 2)
	wantBusy(apiErr, h, errBodiesBusy)

	keep(read(pro, "key_1", 40_000))
	keep(read(pro, "key_1", 40_000)) // 128 KiB: its ceiling
	_, apiErr, h = read(pro, "key_1", 2)
	wantBusy(apiErr, h, errCallerBusy)
	keep(read(pro, "key_2", 2)) // another caller of the tier is served
	// A caller that hangs up mid-body gives back what it held.
	hangup := httptest.NewRequest("POST", "/", io.MultiReader(bytes.NewReader(make([]byte, 30_000)), iotest.ErrReader(io.ErrUnexpectedEOF)))
	if _, apiErr := ReadBody(httptest.NewRecorder(), hangup, lim, Holder{Share: pro, Caller: "key_3"}); apiErr == nil {
		t.Error("a body cut short was accepted")
	}
	if got, want := pro.Held(), int64(128<<10+firstBodyChunk); got != want {
		t.Errorf("pro holds %d bytes, want %d", got, want)
	}
	if n := callers.Len(); n != 3 {
		t.Errorf("%d callers counted, want 3", n)
	}

	for i := range held {
		held[i].Release()
	}
	if n := callers.Len(); n != 0 {
		t.Errorf("%d callers still counted once their bodies were released, want 0", n)
	}
	if a, p, all := anonymous.Held(), pro.Held(), BufferedBytes(); a != 0 || p != 0 || all != 0 {
		t.Errorf("still held: %d anonymous, %d pro, %d in all; want none", a, p, all)
	}
}

// TestReadBodySharesConcurrently reads bodies of many callers at once,
// some of them refused: every byte is given back, and no caller stays.
func TestReadBodySharesConcurrently(t *testing.T) {
	lim := &BodyLimits{Size: 100_000, MaxBuffered: 600_000}
	callers := NewCallers()
	shares := []*Share{callers.Share(300_000, 100_000), callers.Share(400_000, 150_000)}
	var wg sync.WaitGroup
	var served, refused atomic.Int64
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				s := shares[(g+i)%2]
				r := httptest.NewRequest("POST", "/", bytes.NewReader(make([]byte, (g*7919+i*104729)%100_000)))
				body, apiErr := ReadBody(httptest.NewRecorder(), r, lim, Holder{Share: s, Caller: strconv.Itoa(i % 5)})
				if apiErr != nil {
					refused.Add(1)
					continue
				}
				served.Add(1)
				runtime.Gosched()
				body.Release()
			}
		})
	}
	wg.Wait()
	if served.Load() == 0 || refused.Load() == 0 {
		t.Logf("%d served, %d refused", served.Load(), refused.Load())
	}
	if n := callers.Len(); n != 0 {
		t.Errorf("%d callers still counted, want 0", n)
	}
	if a, b, all := shares[0].Held(), shares[1].Held(), BufferedBytes(); a != 0 || b != 0 || all != 0 {
		t.Errorf("still held: %d and %d by the shares, %d in all; want none", a, b, all)
	}
}

// BenchmarkReadBody reads a small chat body, as most requests carry,
// and gives its memory back: the accounting of the body budget is on
// this path.
func BenchmarkReadBody(b *testing.B) {
	lim := &BodyLimits{Size: 10_000_000, MaxBuffered: 64 << 20}
	chat := []byte(`{"model":"vigthoria-fast-1","max_tokens":16,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}`)
	for _, who := range []struct {
		name string
		Holder
	}{
		{"process", Holder{}},
		{"share", Holder{Share: NewCallers().Share(32<<20, 10_000_000), Caller: "key_0123456789abcdef"}},
	} {
		b.Run(who.name, func(b *testing.B) {
			src := new(replay)
			r := httptest.NewRequest("POST", "/v1/chat/completions", nil)
			w := httptest.NewRecorder()
			b.ReportAllocs()
			for b.Loop() {
				src.Reset(chat)
				r.Body, r.ContentLength = src, int64(len(chat))
				body, apiErr := ReadBody(w, r, lim, who.Holder)
				if apiErr != nil {
					b.Fatal(apiErr.Message)
				}
				body.Release()
			}
		})
	}
}

// replay is a request body that can be reused without an allocation.
type replay struct{ bytes.Reader }

func (*replay) Close() error { return nil }

// TestCompactBody checks that a body about to wait holds what it sends,
// not its pooled buffer: the budgets count its length, the request
// replays the same bytes, and Release gives back exactly what is held.
func TestCompactBody(t *testing.T) {
	lim := &BodyLimits{Size: 64 << 10, MaxBuffered: 1 << 20}
	share := NewCallers().Share(512<<10, 128<<10)
	for _, rewritten := range []bool{false, true} {
		const sent = `{"model":"m","messages":[]}`
		r := httptest.NewRequest("POST", "/", strings.NewReader(sent))
		body, apiErr := ReadBody(httptest.NewRecorder(), r, lim, Holder{Share: share, Caller: "a"})
		if apiErr != nil {
			t.Fatal(apiErr.Code)
		}
		c := &Call{Body: body.Bytes()}
		want := sent
		if rewritten { // policy's rewrite, as a cap injected
			want = `{"model":"m","messages":[],"max_tokens":16}`
			c.Body = []byte(want)
			r.Body = io.NopCloser(strings.NewReader(want))
		}
		if held := BufferedBytes(); held != firstBodyChunk {
			t.Fatalf("held %d before, want the first chunk", held)
		}
		body.Compact(r, c)
		if held, shared := BufferedBytes(), share.Held(); held != int64(len(want)) || shared != held {
			t.Errorf("rewritten %v: held %d, the share %d; want %d", rewritten, held, shared, len(want))
		}
		if got, _ := io.ReadAll(r.Body); string(got) != want || string(c.Body) != want {
			t.Errorf("rewritten %v: replays %q, the call sends %q; want %q", rewritten, got, c.Body, want)
		}
		body.Release()
		if held, shared := BufferedBytes(), share.Held(); held != 0 || shared != 0 {
			t.Errorf("rewritten %v: after Release, %d held, %d of the share", rewritten, held, shared)
		}
	}
}
