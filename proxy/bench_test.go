package proxy

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// benchStreamTokens is the length of the benchmark's answer.
const benchStreamTokens = 20

// eventReader returns one server-sent event per Read, as an upstream that
// flushes every event does, then io.EOF. Unlike chunkedReader it leaves
// its events as they are, so they can be read again.
type eventReader struct {
	events [][]byte
	next   int
}

func (r *eventReader) Read(p []byte) (int, error) {
	if r.next == len(r.events) {
		return 0, io.EOF
	}
	ev := r.events[r.next]
	if len(p) < len(ev) {
		return 0, io.ErrShortBuffer // never with the benchmark's buffer
	}
	r.next++
	return copy(p, ev), nil
}

func (r *eventReader) Close() error { return nil }

// standinStream returns the events of a streamed chat answer of the given
// length from the stand-in upstream, usage chunk included, as the proxy
// asks for it.
func standinStream(tb testing.TB, tokens int) [][]byte {
	tb.Helper()
	const key = "bench-key"
	up := standin.New(standin.Options{APIKey: key, NoRecord: true})
	body := `{"model":"vigthoria-fast-1","stream":true,"stream_options":{"include_usage":true},` +
		`"max_tokens":` + strconv.Itoa(tokens) + `,"messages":[{"role":"user","content":"Tell me a story"}]}`
	req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	w := httptest.NewRecorder()
	up.ServeHTTP(w, req)
	if w.Code != http.StatusOK {
		tb.Fatalf("stand-in answered %d: %s", w.Code, w.Body)
	}
	var events [][]byte
	for ev := range bytes.SplitAfterSeq(w.Body.Bytes(), []byte("\n\n")) {
		if len(ev) > 0 { // the empty piece after the last event
			events = append(events, ev)
		}
	}
	return events
}

// BenchmarkSSETap reads a 20-token streamed chat answer through the
// sseBody with the usage tap on and the usage chunk stripped, one event
// per upstream read, as Forward does for a client that did not ask for
// usage.
// BenchmarkSSETap reads a stream through the proxy's tap: as it is, and
// with idle_timeout set, as a billed stream is read with it (idleStream:
// its own reading goroutine, so that its call may go on past a silence).
func BenchmarkSSETap(b *testing.B) {
	events := standinStream(b, benchStreamTokens)
	usageEvent := events[len(events)-2] // before data: [DONE]
	var size int
	for _, ev := range events {
		size += len(ev)
	}
	want := size - len(usageEvent)
	ctx, logger := context.Background(), zap.NewNop()
	buf := make([]byte, 32<<10) // as large as the reverse proxy's copy buffer
	for _, bc := range []struct {
		name string
		body func(src io.ReadCloser, c *Call) io.ReadCloser
	}{
		{"plain", func(src io.ReadCloser, _ *Call) io.ReadCloser { return src }},
		{"idle_timeout", func(src io.ReadCloser, c *Call) io.ReadCloser {
			return newIdleStream(ctx, src, c, time.Minute, 1<<30)
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				c := &Call{StripUsage: true}
				body := newSSEBody(ctx, bc.body(io.NopCloser(&eventReader{events: events}), c), logger, c, 1<<30)
				n, err := drain(body, buf)
				body.Close()
				if err != nil || n != want {
					b.Fatalf("read %d bytes (err %v), want %d: the usage chunk alone stripped", n, err, want)
				}
				if !c.Usage.Reported || c.Usage.Chunks != benchStreamTokens {
					b.Fatalf("usage %+v, want it reported with %d content chunks", c.Usage, benchStreamTokens)
				}
			}
		})
	}
}

// drain reads r to its end into buf, as the reverse proxy's copy loop
// does, and returns how many bytes it read.
func drain(r io.Reader, buf []byte) (int, error) {
	total := 0
	for {
		n, err := r.Read(buf)
		total += n
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// BenchmarkParseRequest reads the policed fields of a typical small chat.
func BenchmarkParseRequest(b *testing.B) {
	body := []byte(`{"model":"vigthoria-fast-1","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence, please."}],"max_tokens":64,"temperature":0.7,"stream":false}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseRequest(body); err != nil {
			b.Fatal(err)
		}
	}
}

// headerWriter is a ResponseWriter that keeps nothing, so that a benchmark
// measures the handler, not a recorder.
type headerWriter struct{ h http.Header }

func (w *headerWriter) Header() http.Header         { return w.h }
func (w *headerWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *headerWriter) WriteHeader(int)             {}

// BenchmarkModelsCacheHit answers GET /v1/models from a cached, filtered
// list, as every call but the first in a TTL does.
func BenchmarkModelsCacheHit(b *testing.B) {
	p, err := newPool("https://api.example.com/v1", []ServerKey{{Key: "bench-models"}}, &Config{}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	up := &Upstream{tenant: p.keys[0].tenant, pool: p, modelsHeaders: modelsShapers[:]}
	r := httptest.NewRequest(http.MethodGet, "/v1/models", nil)
	body := []byte(`{"object":"list","data":[{"id":"vigthoria-fast-1","object":"model"},{"id":"vigthoria-pro-1","object":"model"},{"id":"vigthoria-embed-1","object":"model"}]}`)
	key := up.modelsKey(r.Header)
	modelLists.Add(key, &modelList{body: body, fetched: time.Now(), filtered: make(map[string]filteredList)})
	b.Cleanup(func() { modelLists.Remove(key) })
	filter := ModelFilter{Key: "free", Allows: func(m string) bool { return strings.HasPrefix(m, "vigthoria-fast-") }}
	w := &headerWriter{h: make(http.Header)}
	b.ReportAllocs()
	for b.Loop() {
		clear(w.h)
		var c Call
		if err := up.ServeModels(w, r, nil, time.Hour, filter, &c); err != nil || c.Usage.Cache != "HIT" {
			b.Fatalf("ServeModels: %v, cache %q", err, c.Usage.Cache)
		}
	}
}

// BenchmarkParseUsage reads the usage object at the end of a whole chat
// answer, with the details objects OpenAI-compatible servers send: the
// object alone, and the end of a longer answer as the proxy reads it
// (jsonTailSize of it, text before the object, a field after it), where
// the key is sought back from the end. A search that is faster on the
// first may be far slower on the second: one forward for the key's 'u',
// of which English has many, took about 2.5 µs there against 0.44 µs.
func BenchmarkParseUsage(b *testing.B) {
	usage := `"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,` +
		`"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},` +
		`"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}`
	text := strings.Repeat("The quick brown fox jumps over the lazy dog, but usually not quite. ", 64)
	answer := []byte(`{"id":"chatcmpl-1","choices":[{"index":0,"message":{"role":"assistant","content":"` + text +
		`"},"logprobs":null,"finish_reason":"stop"}],` + usage + `,"system_fingerprint":"fp_1"}`)
	for _, tc := range []struct {
		name string
		tail []byte
	}{
		{"object", []byte(`"logprobs":null,"finish_reason":"stop"}],` + usage + `}`)},
		{"answer", answer[max(len(answer)-jsonTailSize, 0):]},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.SetBytes(int64(len(tc.tail)))
			b.ReportAllocs()
			for b.Loop() {
				var u AnswerUsage
				if !parseUsage(tc.tail, &u) || u.Total() != 29 {
					b.Fatalf("usage %+v, want 19+10 reported", u)
				}
			}
		})
	}
}
