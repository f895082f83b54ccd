package tests

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// slowBody opens a connection to addr and sends the headers of a POST to
// path announcing length bytes of body, and the first byte of it. The
// connection is closed when the test ends.
func slowBody(t *testing.T, addr, path string, length int, header string) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dialling %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	_, err = fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n{",
		path, addr, length, header)
	if err != nil {
		t.Fatalf("writing to %s: %v", addr, err)
	}
	return conn
}

// readResponse reads the response on conn, waiting at most 20 seconds.
func readResponse(t *testing.T, conn net.Conn) *http.Response {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

// peakRSS returns the most memory a process held resident, in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`VmHWM:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no VmHWM in /proc/%d/status", pid)
	}
	kb, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return kb << 10
}

// TestSlowBodiesBoundMemory opens 1,000 connections that announce 10 MB
// bodies and send one byte each, as anonymous callers, against Caddy in a
// process of its own: its peak memory grows by less than 100 MB over
// what it held idle (about 37 MB measured; unbounded, it would be 10 GB),
// and a caller with a key is still served. The growth, not the peak: what
// the process holds idle varies by tens of MB from run to run. Under the
// race detector the bound is 250 MB: it keeps bookkeeping of twice the
// size of each of the 1,000 waiting goroutines' stacks, about 180 MB in
// all, and 32 MB more each time the request path passes a stack size
// (16 KB, 32 KB).
func TestSlowBodiesBoundMemory(t *testing.T) {
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	db := filepath.Join(t.TempDir(), "keys.db")
	key := createKey(t, db, "pro")
	c := harness.StartProcess(t, vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}",
		"store sqlite "+db, "tier free", "tier pro", "anonymous free"))
	addr := strings.TrimPrefix(c.URL, "http://")
	before := peakRSS(t, c.Pid)

	const conns = 1000
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	for range 10 { // ten dialers, so that the kernel's accept queue keeps up
		wg.Go(func() {
			for range conns / 10 {
				conn := slowBody(t, addr, "/v1/chat/completions", 10_000_000, "")
				mu.Lock()
				open = append(open, conn)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	time.Sleep(time.Second) // let Caddy read what was sent

	client := newClient(c.URL, key)
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("still served?")); err != nil {
		t.Errorf("a caller with a key while 1,000 bodies trickle in: %v", err)
	}
	peak := peakRSS(t, c.Pid)
	t.Logf("peak RSS: %d MB before, %d MB with %d slow bodies open", before>>20, peak>>20, len(open))
	bound := int64(100 << 20)
	if raceBuild {
		bound = 250 << 20
	}
	if peak-before > bound {
		t.Errorf("peak RSS grew by %d MB with %d slow 10 MB bodies, want under %d MB", (peak-before)>>20, conns, bound>>20)
	}
}

// TestSlowBodyTimesOut checks body_timeout: a body still arriving when it
// ends is refused with 408 in the API's error shape, and the caller's
// concurrency slot is free again.
func TestSlowBodyTimesOut(t *testing.T) {
	e, keys := startWithKeys(t, []string{"one"}, "body_timeout 1s", "tier one {\n\t\t\tconcurrent 1\n\t\t}")
	key := keys[0]
	conn := slowBody(t, strings.TrimPrefix(e.caddy.URL, "http://"), "/v1/chat/completions", 1000, "Authorization: Bearer "+key+"\r\n")
	res := readResponse(t, conn)
	wantAPIError(t, res, http.StatusRequestTimeout, "request_timeout")

	// A chunked body with no length to announce, trickling: the same.
	addr := strings.TrimPrefix(e.caddy.URL, "http://")
	chunked, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { chunked.Close() })
	fmt.Fprintf(chunked, "POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n", addr, key)
	wantAPIError(t, readResponse(t, chunked), http.StatusRequestTimeout, "request_timeout")

	client := newClient(e.caddy.URL, key)
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("after a timeout")); err != nil {
		t.Errorf("the slot of the timed-out body is still held: %v", err)
	}
	e.wantUpstreamCalls(t, 1)
}

// TestLimitsComeBeforeTheBody checks that what needs no body is decided
// before reading it: a caller at its concurrency limit is refused while
// its first body is still arriving, and bodies refused as invalid count
// against the caller's request limit.
func TestLimitsComeBeforeTheBody(t *testing.T) {
	e, keys := startWithKeys(t, []string{"one", "three"}, "tier one {\n\t\t\tconcurrent 1\n\t\t}", "tier three {\n\t\t\trequests 3/1h\n\t\t}")
	one, three := keys[0], keys[1]

	t.Run("concurrency", func(t *testing.T) {
		slowBody(t, strings.TrimPrefix(e.caddy.URL, "http://"), "/v1/chat/completions", 1000, "Authorization: Bearer "+one+"\r\n")
		var res *http.Response
		deadline := time.Now().Add(5 * time.Second)
		for { // until Caddy has admitted the slow body
			res = e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader("{}"), http.Header{"Authorization": {"Bearer " + one}})
			if res.StatusCode != http.StatusBadRequest || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		wantAPIError(t, res, http.StatusTooManyRequests, "rate_limit_exceeded")
	})
	t.Run("invalid bodies count", func(t *testing.T) {
		for i := range 3 {
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader("not json"), http.Header{"Authorization": {"Bearer " + three}})
			wantAPIError(t, res, http.StatusBadRequest, "invalid_request")
			if i == 0 && res.Header.Get("X-Ratelimit-Remaining-Requests") != "2" {
				t.Errorf("x-ratelimit-remaining-requests = %q after one invalid body, want 2", res.Header.Get("X-Ratelimit-Remaining-Requests"))
			}
		}
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader("not json"), http.Header{"Authorization": {"Bearer " + three}})
		wantAPIError(t, res, http.StatusTooManyRequests, "rate_limit_exceeded")
	})
	e.wantUpstreamCalls(t, 0)
}

// TestBodiesShareABudget checks max_buffered: while bodies in flight hold
// it (here pro's share, half of it), a new body is refused with 503 and
// Retry-After.
func TestBodiesShareABudget(t *testing.T) {
	e := start(t, "max_body 1MB", "max_buffered 2MB")
	conn := slowBody(t, strings.TrimPrefix(e.caddy.URL, "http://"), "/v1/chat/completions", 1_000_000, "Authorization: Bearer "+e.key+"\r\n")
	if _, err := conn.Write(make([]byte, 999_000)); err != nil {
		t.Fatal(err)
	}
	// Caddy runs in this process: wait until the slow body holds nearly
	// all of the budget.
	deadline := time.Now().Add(5 * time.Second)
	for proxy.BufferedBytes() < 999_000 {
		if time.Now().After(deadline) {
			t.Fatalf("the slow body holds %d bytes, want 999000", proxy.BufferedBytes())
		}
		time.Sleep(10 * time.Millisecond)
	}
	res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(`{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hi"}]}`), nil)
	if res.Header.Get("Retry-After") == "" {
		t.Error("no Retry-After on the 503")
	}
	wantAPIError(t, res, http.StatusServiceUnavailable, "proxy_busy")
	e.wantUpstreamCalls(t, 0)
}

// TestUsageCountsAsARequest checks that GET /v1/usage, a store read, is
// counted against the caller's request limit like any other request, but
// takes no concurrency slot: a caller whose one slot is busy reads it.
func TestUsageCountsAsARequest(t *testing.T) {
	e, keys := startWithKeys(t, []string{"three"}, "tier three {\n\t\t\trequests 4/1h\n\t\t\tconcurrent 1\n\t\t}")
	key := keys[0]
	// The one slot, held by a body that is still arriving.
	slowBody(t, strings.TrimPrefix(e.caddy.URL, "http://"), "/v1/chat/completions", 1000, "Authorization: Bearer "+key+"\r\n")
	var u usageAnswer
	deadline := time.Now().Add(5 * time.Second)
	for u.Limits.Concurrent == nil || u.Limits.Concurrent.InFlight != 1 { // until Caddy has admitted it
		if time.Now().After(deadline) {
			t.Fatal("the slow body was not admitted")
		}
		u, _ = e.usage(t, key)
	}
	for range 4 {
		res := e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer " + key}})
		if res.StatusCode == http.StatusTooManyRequests {
			wantAPIError(t, res, http.StatusTooManyRequests, "rate_limit_exceeded")
			return
		}
		if res.StatusCode != http.StatusOK {
			t.Fatalf("usage with the slot busy: status %d, want 200", res.StatusCode)
		}
	}
	t.Error("GET /v1/usage was answered past the request limit of 4")
}

// TestCallerChosenTierIsNoLabel checks that tier names a caller can choose
// (identity's tier from a placeholder) never become metric labels.
func TestCallerChosenTierIsNoLabel(t *testing.T) {
	e := start(t, "identity {http.request.header.X-User} tier {http.request.header.X-Tier}")
	for i := range 20 {
		res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{
			"Authorization": nil, "X-User": {"alice"}, "X-Tier": {fmt.Sprintf("made-up-%d-%s", i, strings.Repeat("x", 500))},
		})
		wantAPIError(t, res, http.StatusForbidden, "tier_not_configured")
	}
	res, err := http.Get(e.caddy.AdminURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	m, _ := io.ReadAll(res.Body)
	if strings.Contains(string(m), "made-up-") {
		t.Error("a tier name the caller chose is a metric label")
	}
	if !strings.Contains(string(m), `outcome="refused_tier_not_configured",tier="unknown"`) {
		t.Error(`the refusals are not counted under tier="unknown"`)
	}
}

// TestOverlongIdentityIsRefused checks that an identity longer than the
// proxy accepts is refused clearly, never taken for another caller
// (anonymous, here).
func TestOverlongIdentityIsRefused(t *testing.T) {
	e := start(t, "identity {http.request.header.X-User} tier pro", "anonymous free")
	// Chats, not GET /v1/models, whose list the process shares between
	// configs of the same upstream URL and key: an earlier test's stand-in
	// on the same port may have filled it.
	chat := `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hi"}]}`
	as := func(user string) http.Header {
		return http.Header{"Authorization": nil, "X-User": {user}, "Content-Type": {"application/json"}}
	}
	res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(chat), as(strings.Repeat("u", 129)))
	wantAPIError(t, res, http.StatusBadRequest, "identity_too_long")
	res = e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(chat), as(strings.Repeat("u", 128)))
	if res.StatusCode != http.StatusOK {
		t.Errorf("an identity of 128 characters: status %d, want 200", res.StatusCode)
	}
	e.wantUpstreamCalls(t, 1)
}

// validate adapts a site with a vigthoria block of the given lines and
// validates it as `caddy validate` does, returning its error.
func validate(t *testing.T, lines ...string) error {
	t.Helper()
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	lines = append([]string{"store sqlite " + filepath.Join(t.TempDir(), "k.db")}, lines...)
	cfg, err := harness.Adapt("{\n\tadmin off\n}\n\nhttp://127.0.0.1:1 {\n" +
		vigthoriaBlock("http://127.0.0.1:1/v1", "{env.VIGTHORIA_TEST_KEY}", lines...) + "\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	var c caddy.Config
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatal(err)
	}
	return caddy.Validate(&c)
}

// TestReservedTierNames checks that no tier may be named as the metric
// label of callers without a configured tier.
func TestReservedTierNames(t *testing.T) {
	for _, name := range []string{"none", "unknown"} {
		if err := validate(t, "tier "+name); err == nil || !strings.Contains(err.Error(), "reserved") {
			t.Errorf("tier %s: validate said %v, want the name refused as reserved", name, err)
		}
	}
}

// TestBodyBudgetBelowOneBodyIsRefused checks that max_buffered, and a
// tier's share of it, cannot be set below max_body, where a largest body
// could never be received, nor the shares past max_buffered.
func TestBodyBudgetBelowOneBodyIsRefused(t *testing.T) {
	for _, lines := range [][]string{
		{"tier free", "max_body 10MB", "max_buffered 1MB"},
		{"tier free {\n\t\t\tmax_buffered 1MB\n\t\t}", "max_body 10MB"},
		{"tier free", "tier pro", "max_body 10MB", "max_buffered 10MB"}, // 5 MB a tier
		{"tier free {\n\t\t\tmax_buffered 40MB\n\t\t}", "tier pro {\n\t\t\tmax_buffered 40MB\n\t\t}", "max_buffered 64MB"},
	} {
		if err := validate(t, lines...); err == nil || !strings.Contains(err.Error(), "max_buffered") {
			t.Errorf("%q: validate said %v, want it refused", lines, err)
		}
	}
	if err := validate(t, "tier free", "max_body 10MB"); err != nil {
		t.Errorf("max_body 10MB with the default max_buffered: %v", err)
	}
}

// TestModelNamesAreBounded checks that a model name a caller chooses is
// bounded before anything is forwarded or stored, and that a name the
// upstream did not answer for never becomes a ledger row of its own.
func TestModelNamesAreBounded(t *testing.T) {
	e := start(t)
	for _, name := range []string{"vigthoria-fast-" + strings.Repeat("x", 300), "vigthoria-fast-1\nkey_FAKE", "vigthoria-\x1b[2Kfast"} {
		res := e.do(t, http.MethodPost, "/v1/chat/completions", jsonBody(map[string]any{
			"model": name, "messages": []map[string]string{{"role": "user", "content": "hi"}},
		}), nil)
		wantAPIError(t, res, http.StatusBadRequest, "invalid_model")
	}
	e.wantUpstreamCalls(t, 0)

	made := "vigthoria-made-up-" + strings.Repeat("y", 200)
	res := e.do(t, http.MethodPost, "/v1/chat/completions", jsonBody(map[string]any{
		"model": made, "messages": []map[string]string{{"role": "user", "content": "hi"}},
	}), nil)
	if res.StatusCode != http.StatusNotFound {
		t.Fatalf("an unknown model: status %d, want the upstream's 404", res.StatusCode)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		u, _ := e.usage(t, e.key)
		var names []string
		for _, m := range u.ByModel {
			names = append(names, m.Model)
		}
		if len(names) == 1 && names[0] == "(not answered)" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the ledger's models are %q, want only the request the upstream did not answer, unnamed", names)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
