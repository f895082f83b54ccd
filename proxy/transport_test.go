package proxy

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func TestReadLimitWord(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	for _, tc := range []struct {
		name      string
		status    int
		header    http.Header
		body      string
		keyFor    time.Duration // 0: the key is not spent
		modelFor  time.Duration // 0: the model is not spent
		retryLeft time.Duration // retried with this much of max_wait left?
		retried   bool
	}{
		{"200 with remaining", 200, http.Header{"X-Ratelimit-Remaining": {"12"}, "X-Ratelimit-Reset": {"30"}}, "", 0, 0, 10 * time.Second, false},
		{"200 key spent until reset", 200, http.Header{"X-Ratelimit-Remaining": {"0"}, "X-Ratelimit-Reset": {"30"}}, "", 30 * time.Second, 0, 10 * time.Second, false},
		{"200 model's tokens spent, OpenAI form", 200, http.Header{"X-Ratelimit-Remaining-Tokens": {"0"}, "X-Ratelimit-Reset-Tokens": {"6m0s"}}, "", 0, 6 * time.Minute, 10 * time.Second, false},
		{"200 model's requests spent, key's not", 200, http.Header{"X-Ratelimit-Remaining": {"40"}, "X-Ratelimit-Reset": {"30"},
			"X-Ratelimit-Remaining-Requests": {"0"}, "X-Ratelimit-Reset-Requests": {"720h"}}, "", 0, 720 * time.Hour, 10 * time.Second, false},
		{"429 about the request, Retry-After 60", 429, http.Header{"Retry-After": {"60"}, "X-Ratelimit-Remaining": {"900"}},
			`{"error":{"type":"tokens","code":"rate_limit_exceeded"}}`, 0, 0, 10 * time.Second, false},
		{"429 about the request, short wait", 429, http.Header{"Retry-After": {"1"}}, `{"error":{"code":"rate_limit_exceeded"}}`, 0, 0, 10 * time.Second, true},
		{"429 about the request, no wait named", 429, nil, `{"error":{"code":"rate_limit_exceeded"}}`, 0, 0, 10 * time.Second, false},
		{"429 model spent, requests form", 429, http.Header{"Retry-After": {"7"}, "X-Ratelimit-Remaining-Requests": {"0"}}, "", 0, 7 * time.Second, 10 * time.Second, true},
		{"429 model spent, no wait named", 429, http.Header{"X-Ratelimit-Remaining-Tokens": {"0"}}, "", 0, time.Second, 10 * time.Second, true},
		{"429 key spent, wait past max_wait", 429, http.Header{"Retry-After": {"20"}, "X-Ratelimit-Remaining": {"0"}}, "", 20 * time.Second, 0, 10 * time.Second, false},
		{"429 insufficient_quota", 429, nil, `{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}`, quotaPause, 0, 10 * time.Minute, false},
		{"429 insufficient_quota on a model's spent count", 429, http.Header{"Retry-After": {"30"}, "X-Ratelimit-Remaining-Tokens": {"0"}},
			`{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}`, 30 * time.Second, 30 * time.Second, 10 * time.Minute, false},
		{"429 retry-after-ms", 429, http.Header{"Retry-After-Ms": {"1500"}, "X-Ratelimit-Remaining": {"0"}}, "", 1500 * time.Millisecond, 0, 10 * time.Second, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := &http.Response{StatusCode: tc.status, Header: tc.header, Body: io.NopCloser(strings.NewReader(tc.body))}
			if res.Header == nil {
				res.Header = http.Header{}
			}
			w := readLimitWord(res, now)
			for _, got := range []struct {
				what  string
				until time.Time
				want  time.Duration
			}{{"key", w.keyUntil, tc.keyFor}, {"model", w.modelUntil, tc.modelFor}} {
				var d time.Duration
				if !got.until.IsZero() {
					d = got.until.Sub(now)
				}
				if d != got.want {
					t.Errorf("%s spent for %v, want %v", got.what, d, got.want)
				}
			}
			if tc.status == 429 && w.retryable429(tc.retryLeft) != tc.retried {
				t.Errorf("retried = %v, want %v", !tc.retried, tc.retried)
			}
			if rest, _ := io.ReadAll(res.Body); string(rest) != tc.body {
				t.Errorf("body left to the caller = %q, want %q", rest, tc.body)
			}
		})
	}
}

func TestCheckUpstreamHeaders(t *testing.T) {
	if got, err := CheckUpstreamHeaders([]string{"x-trace-id", "X-Tenant"}); err != nil || got[0] != "X-Trace-Id" || got[1] != "X-Tenant" {
		t.Errorf("got %v, %v; want the canonical names", got, err)
	}
	for _, bad := range []string{"Authorization", "cookie", "Host", "Connection", "Upgrade", "Forwarded", "X-Forwarded-For",
		"X-Auth-Token", "X-Amz-Security-Token", "X-Client-Secret", "Session-Token", "X-Vigthoria-Key", "X-Api-Key",
		"OpenAI-Organization", "X-Real-IP", "X-HTTP-Method-Override", "Accept-Encoding", "bad header", ""} {
		if _, err := CheckUpstreamHeaders([]string{bad}); err == nil {
			t.Errorf("%q accepted, want refused", bad)
		}
	}
}

func TestFilterKeyNamesThePolicy(t *testing.T) {
	a := FilterKey([]string{"vigthoria-fast-*", "vigthoria-embed-*"})
	if b := FilterKey([]string{"vigthoria-embed-*", "vigthoria-fast-*", "vigthoria-fast-*"}); a != b {
		t.Errorf("equal policies: %q and %q", a, b)
	}
	if c := FilterKey([]string{"vigthoria-fast-*"}); c == a {
		t.Errorf("different policies share %q", c)
	}
	if FilterKey([]string{"a,b"}) == FilterKey([]string{"a", "b"}) {
		t.Error("a glob with a comma joins like two globs")
	}
	if FilterKey(nil) != "" {
		t.Error("no globs (every model) is not the empty key")
	}
}

// nopTransport answers every request with a small JSON 200.
type nopTransport struct{ header http.Header }

func (n nopTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	h := make(http.Header, len(n.header))
	for k, v := range n.header {
		h[k] = v
	}
	return &http.Response{StatusCode: 200, Header: h, Body: http.NoBody, Request: req}, nil
}

// BenchmarkKeyTransportHeaders measures what the transport does to an
// SDK's request headers and the API's answer headers, the upstream itself
// stubbed out.
func BenchmarkKeyTransportHeaders(b *testing.B) {
	t := &keyTransport{
		next: nopTransport{header: http.Header{
			"Content-Type": {"text/event-stream"}, "X-Request-Id": {"req_1"}, "Openai-Organization": {"org-x"},
			"Openai-Processing-Ms": {"12"}, "Set-Cookie": {"__cf_bm=1"}, "X-Ratelimit-Limit": {"10000"},
			"X-Ratelimit-Remaining": {"9999"}, "X-Ratelimit-Reset": {"1700000060"}, "Date": {"now"},
		}},
		host:   "api.example.com",
		pool:   testPool(nil, ServerKey{Key: "server"}),
		logger: zap.NewNop(),
	}
	req, _ := http.NewRequest(http.MethodPost, "http://api.example.com/v1/chat/completions", nil)
	req.Header = http.Header{
		"Authorization": {"Bearer vgt_x"}, "Content-Type": {"application/json"}, "Accept": {"application/json"},
		"User-Agent": {"OpenAI/Go 3.0.0"}, "X-Stainless-Lang": {"go"}, "X-Stainless-Package-Version": {"3.0.0"},
		"X-Stainless-Os": {"Linux"}, "X-Stainless-Arch": {"x64"}, "X-Stainless-Runtime": {"go"},
		"X-Stainless-Runtime-Version": {"go1.26"}, "X-Stainless-Retry-Count": {"0"}, "Idempotency-Key": {"stainless-1"},
		"X-Forwarded-For": {"10.0.0.1"}, "X-Forwarded-Proto": {"http"}, "X-Forwarded-Host": {"proxy"}, "Via": {"1.1 Caddy"},
	}
	b.ReportAllocs()
	for b.Loop() {
		res, err := t.RoundTrip(req)
		if err != nil {
			b.Fatal(err)
		}
		res.Body.Close()
	}
}

// BenchmarkKeyTransportCall is BenchmarkKeyTransportHeaders for a request
// the upstream may bill, as every POST is: its upstream context is
// detached from its caller's and watched (detach.go). header_timeout runs
// its round trip on a goroutine of its own (timedRoundTrip).
func BenchmarkKeyTransportCall(b *testing.B) {
	for _, bc := range []struct {
		name          string
		headerTimeout time.Duration
	}{{"plain", 0}, {"header_timeout", time.Minute}} {
		b.Run(bc.name, func(b *testing.B) {
			t := &keyTransport{
				next:          nopTransport{header: http.Header{"Content-Type": {"text/event-stream"}}},
				host:          "api.example.com",
				pool:          testPool(nil, ServerKey{Key: "server"}),
				detach:        DetachPolicy{Max: DefaultMaxDetached, Timeout: DefaultDetachedTimeout},
				headerTimeout: bc.headerTimeout,
				logger:        zap.NewNop(),
			}
			caller, cancel := context.WithCancel(context.Background())
			defer cancel()
			vars := map[string]any{}
			req, _ := http.NewRequestWithContext(context.WithValue(caller, caddyhttp.VarsCtxKey, vars), http.MethodPost, "http://api.example.com/v1/chat/completions", nil)
			req.Header = http.Header{"Content-Type": {"application/json"}, "User-Agent": {"OpenAI/Go 3.0.0"}}
			b.ReportAllocs()
			for b.Loop() {
				c := new(Call)
				c.Usage.Watch(caller)
				c.Usage.Stream = true
				vars[callVar] = c
				res, err := t.RoundTrip(req)
				if err != nil {
					b.Fatal(err)
				}
				res.Body.Close()
				c.finish()
			}
		})
	}
}
