package tests

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

const (
	serverKey = "vig-server-key-0123456789abcdefSECRET"
	model     = "vigthoria-fast-1"
)

// env is one test's world: a stand-in upstream, Caddy in front of it with
// an SQLite key store holding one client key of tier "pro", and a client
// pointed at Caddy with that key.
type env struct {
	upstream *standin.Server
	server   *httptest.Server
	caddy    *harness.Caddy
	client   openai.Client
	key      string // the client key
	store    string // the store, as the CLI's --store takes it
}

// start runs a stand-in with serverKey and Caddy with a vigthoria block of
// tiers "free" and "pro" and the extra lines; the api_key comes from the
// environment.
func start(t *testing.T, extra ...string) *env {
	t.Helper()
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	return startOn(t, up, srv, srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", extra...)
}

// startOn is start with a given upstream and api_key value.
func startOn(t *testing.T, up *standin.Server, srv *httptest.Server, upstreamURL, apiKey string, extra ...string) *env {
	t.Helper()
	e := newEnv(t, up, srv)
	e.startCaddy(t, upstreamURL, apiKey, extra...)
	return e
}

// newEnv is an env whose store holds its "pro" key, before Caddy starts.
func newEnv(t *testing.T, up *standin.Server, srv *httptest.Server) *env {
	t.Helper()
	t.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	e := &env{upstream: up, server: srv}
	path := filepath.Join(t.TempDir(), "keys.db")
	e.store = "sqlite:" + path
	e.key = createKey(t, path, "pro")
	return e
}

// startCaddy starts the env's Caddy, with tiers "free" and "pro" and the
// extra lines, and its client.
func (e *env) startCaddy(t *testing.T, upstreamURL, apiKey string, extra ...string) {
	t.Helper()
	lines := append([]string{"store " + strings.Replace(e.store, ":", " ", 1), "tier free", "tier pro"}, extra...)
	e.caddy = harness.StartCaddy(t, vigthoriaBlock(upstreamURL, apiKey, lines...))
	e.client = newClient(e.caddy.URL, e.key)
}

// startWithKeys is start with a client key of each of tiers besides,
// created before Caddy starts so that each works from the first request.
func startWithKeys(t *testing.T, tiers []string, extra ...string) (*env, []string) {
	t.Helper()
	up := standin.New(standin.Options{APIKey: serverKey})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := newEnv(t, up, srv)
	keys := make([]string, len(tiers))
	for i, tier := range tiers {
		keys[i] = createKey(t, strings.TrimPrefix(e.store, "sqlite:"), tier)
	}
	e.startCaddy(t, srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", extra...)
	return e, keys
}

// createKey adds a key to the SQLite store at path, which may mint
// tokens of the tiers mint, and returns its secret.
func createKey(t testing.TB, path, tier string, mint ...string) string {
	t.Helper()
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	_, secret, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "test-" + tier, Tier: tier, Mint: mint}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return secret
}

// reload loads the same site with other extra lines, as a config reload.
func (e *env) reload(t *testing.T, extra ...string) {
	t.Helper()
	lines := append([]string{"store " + strings.Replace(e.store, ":", " ", 1), "tier free", "tier pro"}, extra...)
	if err := e.caddy.Load(vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...)); err != nil {
		t.Fatalf("reload: %v", err)
	}
	closeIdle()
}

// closeIdle drops the clients' idle connections after a reload: Caddy
// closes them as it swaps servers, and a POST sent on one at that moment
// fails, as it would for any HTTP client. It first lets the old servers
// stop accepting: a reload returns once their shutdowns were started, not
// done (caddyhttp's App.Stop says so), and a connection an old server
// still accepted is closed under its first request.
func closeIdle() {
	time.Sleep(100 * time.Millisecond)
	http.DefaultClient.CloseIdleConnections()
}

// builtinDefaultCap, as an extra line of a site, leaves default_max_tokens
// at its built-in default. Without it, or a default_max_tokens line of
// the test's own, a test site caps requests without one at 16, the
// stand-in's answer length without a cap: the proxy forwards every
// request with a cap, which the stand-in then fills exactly, and the
// tests' token figures stay those of its answers.
const builtinDefaultCap = "# default_max_tokens: built in"

func vigthoriaBlock(upstream, apiKey string, extra ...string) string {
	lines := []string{"upstream " + upstream, "api_key " + apiKey}
	if !slices.ContainsFunc(extra, func(l string) bool {
		return l == builtinDefaultCap || strings.HasPrefix(l, "default_max_tokens ")
	}) {
		lines = append(lines, "default_max_tokens "+strconv.Itoa(standin.DefaultMaxTokens))
	}
	lines = append(lines, extra...)
	return "\tvigthoria {\n\t\t" + strings.Join(lines, "\n\t\t") + "\n\t}"
}

func newClient(baseURL, key string) openai.Client {
	return openai.NewClient(
		option.WithBaseURL(baseURL+"/v1/"),
		option.WithAPIKey(key),
		option.WithMaxRetries(0),
	)
}

func chatParams(prompt string) openai.ChatCompletionNewParams {
	return openai.ChatCompletionNewParams{
		Model:    model,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(prompt)},
	}
}

// do sends a raw request to the proxy, with the env's client key unless
// header names Authorization (nil for none).
func (e *env) do(t *testing.T, method, path string, body io.Reader, header http.Header) *http.Response {
	t.Helper()
	res, err := http.DefaultClient.Do(e.request(t, method, path, body, header))
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

// request is do's request. Its method and path are the test's own: a
// bad one is the test's bug.
func (e *env) request(t *testing.T, method, path string, body io.Reader, header http.Header) *http.Request {
	req, err := http.NewRequestWithContext(t.Context(), method, e.caddy.URL+path, body)
	if err != nil {
		panic(err)
	}
	if _, ok := header["Authorization"]; !ok {
		req.Header.Set("Authorization", "Bearer "+e.key)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	return req
}

// status sends a request to the proxy from one of the test's
// goroutines, where t.Fatal may not be called, as do would: it reads the
// answer to its end and returns its status, or 0 once it reported the
// error.
func (e *env) status(t *testing.T, method, path, body string, header http.Header) int {
	res, err := http.DefaultClient.Do(e.request(t, method, path, strings.NewReader(body), header))
	if err != nil {
		t.Errorf("%s %s: %v", method, path, err)
		return 0
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res.StatusCode
}

// apiError is the proxy's and the API's error shape.
type apiError struct {
	Error struct {
		Message string `json:"message"`
		Type    string `json:"type"`
		Code    string `json:"code"`
	} `json:"error"`
}

// wantAPIError asserts res is an error in the API's shape with status and code.
func wantAPIError(t *testing.T, res *http.Response, status int, code string) apiError {
	t.Helper()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != status {
		t.Errorf("status = %d, want %d (body %s)", res.StatusCode, status, body)
	}
	if ct := res.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	var e apiError
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		t.Fatalf("body %s is not the API's error shape: %v", body, err)
	}
	if e.Error.Code != code || e.Error.Type == "" || e.Error.Message == "" {
		t.Errorf("error = %+v, want code %q with type and message", e.Error, code)
	}
	return e
}

// wantOpenAIError asserts err is the client library's typed API error.
func wantOpenAIError(t *testing.T, err error, status int, code string) *openai.Error {
	t.Helper()
	var oe *openai.Error
	if !errors.As(err, &oe) {
		t.Fatalf("error = %v (%T), want *openai.Error", err, err)
	}
	if oe.StatusCode != status || oe.Code != code {
		t.Errorf("got status %d code %q, want %d %q", oe.StatusCode, oe.Code, status, code)
	}
	return oe
}

// wantUpstreamCalls asserts how many requests the upstream received.
func (e *env) wantUpstreamCalls(t *testing.T, want int) {
	t.Helper()
	if got := e.upstream.Count(); got != want {
		t.Errorf("upstream received %d requests, want %d", got, want)
	}
}

// lastRequest returns the last request the upstream received.
func (e *env) lastRequest(t *testing.T) standin.Request {
	t.Helper()
	reqs := e.upstream.Requests()
	if len(reqs) == 0 {
		t.Fatal("the upstream received no request")
	}
	return reqs[len(reqs)-1]
}

// wantNoClientSecrets asserts that nothing of the env's client key, and
// nothing but the server key, reached the upstream.
func (e *env) wantNoClientSecrets(t *testing.T, r standin.Request) {
	t.Helper()
	if got := r.Header.Get("Authorization"); got != "Bearer "+serverKey {
		t.Errorf("upstream Authorization = %q, want the server key", got)
	}
	if len(r.Header.Values("Authorization")) != 1 {
		t.Errorf("upstream got %d Authorization headers, want 1", len(r.Header.Values("Authorization")))
	}
	for name, values := range r.Header {
		for _, v := range values {
			if strings.Contains(v, e.key) {
				t.Errorf("client key reached the upstream in %s", name)
			}
		}
	}
	if strings.Contains(string(r.Body), e.key) || strings.Contains(r.RawQuery, e.key) {
		t.Error("client key reached the upstream in the body or query")
	}
}

func jsonBody(v any) io.Reader {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprint("marshalling test body: ", err))
	}
	return bytes.NewReader(b)
}
