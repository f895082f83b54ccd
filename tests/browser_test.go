package tests

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/vigthoria/caddy-vigthoria/internal/demo"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// chromiumPath is where Debian's chromium package puts the browser; the
// Makefile's test-deps target installs it.
const chromiumPath = "/usr/bin/chromium"

// browserTier is the tier of the page's key: a request bucket small enough
// to empty from the page, refilling too slowly (one a minute) to change a
// figure while the test runs.
const browserTier = `tier browser {
			requests 60/1h burst 10
			tokens 100000/1h
			models vigthoria-fast-*
		}`

// TestBrowserDemo drives the demo page in a real headless Chromium: the
// page is served from one origin and calls the proxy on another, as a
// browser frontend does, so every call goes through CORS. It streams an
// answer chunk by chunk, reads the caller's limits from the response
// headers and GET /v1/usage, shows the proxy's refusals (a model outside
// the tier, an emptied request bucket), and a page from an origin the
// proxy does not allow gets nothing. It saves a screenshot as a test
// artifact (kept with go test -artifacts), and as docs/demo.png when
// VIGTHORIA_UPDATE_SCREENSHOT=1.
func TestBrowserDemo(t *testing.T) {
	chromium := findChromium(t)

	// Two page origins, known before Caddy starts so cors can name one.
	allowed, allowedOrigin := pageServer()
	refused, refusedOrigin := pageServer()

	e := start(t, "cors "+allowedOrigin, browserTier)
	e.upstream.SetBehavior(standin.Behavior{ChunkDelay: 150 * time.Millisecond})
	key := createKey(t, strings.TrimPrefix(e.store, "sqlite:"), "browser")
	e.waitKeysKnown(t)

	servePage(t, e, key, allowed, refused)
	b := newBrowser(t, chromium)
	b.openWorking(allowedOrigin)

	// A streamed answer grows in the page as the upstream's events come.
	calls := e.upstream.Count()
	b.send("Hello from the browser")
	final, partial := b.watchStream(15 * time.Second)
	want := standin.Answer(standin.DefaultMaxTokens)
	if final != want {
		t.Fatalf("the page shows the answer %q, want %q (error: %q)", final, want, b.text("#error-text"))
	}
	if len(partial) < 3 {
		t.Errorf("saw the answer grow %d times before it was complete (%q), want at least 3: it did not stream", len(partial), partial)
	}
	for i, p := range partial {
		if !strings.HasPrefix(want, p) || (i > 0 && len(p) <= len(partial[i-1])) {
			t.Errorf("partial answer %d %q does not grow into the answer", i, p)
		}
	}
	b.waitIdle()
	e.wantUpstreamCalls(t, calls+1)
	if r := e.lastRequest(t); !strings.Contains(string(r.Body), `"stream":true`) {
		t.Errorf("the upstream got %s, want a streamed chat", r.Body)
	} else {
		e.wantNoClientSecrets(t, r)
	}

	// The caller's limits, read by the page's script from the headers the
	// proxy exposes to this origin, and from GET /v1/usage.
	// One request so far: the chat. The page's reads of GET /v1/usage,
	// when it loaded and after the chat (whose answer it shows last),
	// count in a bucket of their own.
	if got := b.text("#remaining-requests"); got != "9" {
		t.Errorf("the page shows %q requests left from the headers, want 9 (burst 10, one used)", got)
	}
	if got := b.text("#limit-requests"); got != "10" {
		t.Errorf("the page shows a request limit of %q, want 10", got)
	}
	if v, err := strconv.Atoi(b.attr("#remaining-tokens", "data-value")); err != nil || v <= 0 || v > 100000 {
		t.Errorf("the page shows %q tokens left (%v), want a number up to the 100000 of the tier", b.text("#remaining-tokens"), err)
	}
	if got := b.text("#limit-tokens"); got != "100,000" {
		t.Errorf("the page shows a token limit of %q, want 100,000", got)
	}
	if got := b.text("#ratelimit"); !strings.Contains(got, "r=9") {
		t.Errorf("the page shows the RateLimit header %q, want the requests left in it", got)
	}
	if got := b.attr("#usage-requests", "data-value"); got != "9" {
		t.Errorf("the page shows %q requests left from GET /v1/usage, want 9", got)
	}

	// A model outside the tier: the proxy's 403, as the user sees it.
	calls = e.upstream.Count()
	b.click("#try-model")
	b.waitIdle()
	b.wantError("403", "model_not_allowed")
	if got := b.eval(`[...document.querySelectorAll("#messages .msg.assistant")].pop().className`); !strings.Contains(got, "failed") {
		t.Errorf("the answer to the refused model is %q, want it marked failed", got)
	}
	e.wantUpstreamCalls(t, calls)

	// Emptying the request bucket: the refused model took one more; eight
	// more are admitted, the ninth is refused with 429 and a Retry-After
	// the script can read.
	b.click("#burst")
	b.waitIdle()
	log := b.eval(`[...document.querySelectorAll("#burst-log li")].map(li => li.className + ": " + li.textContent).join("\n")`)
	lines := strings.Split(log, "\n")
	if len(lines) != 9 || strings.Count(log, "ok: 200 OK") != 8 ||
		!strings.HasPrefix(lines[8], "refused: 429 rate_limit_exceeded · retry in ") {
		t.Errorf("the burst log reads\n%s\nwant eight admitted and the ninth refused with 429 rate_limit_exceeded and its Retry-After", log)
	}
	b.wantError("429", "rate_limit_exceeded")
	if got := b.text("#remaining-requests"); got != "0" {
		t.Errorf("after the refusal the page shows %q requests left, want 0", got)
	}
	b.screenshot("demo.png", os.Getenv("VIGTHORIA_UPDATE_SCREENSHOT") == "1")

	// A page on an origin that cors does not list gets no answer the
	// browser lets it read, and nothing reaches the upstream.
	calls = e.upstream.Count()
	b.navigate(refusedOrigin + "/")
	b.waitIdle()
	if got := b.attr("#error", "data-kind"); got != "network" {
		t.Errorf("on a refused origin the page's error is of kind %q (%q), want network: the browser must block the answer", got, b.text("#error-text"))
	}
	b.send("Hello from elsewhere")
	b.waitIdle()
	if got := b.text("#error-text"); !strings.Contains(got, "Could not reach the API") || !strings.Contains(got, refusedOrigin) {
		t.Errorf("on a refused origin the page shows %q, want that it could not reach the API from %s", got, refusedOrigin)
	}
	if got := b.text("#usage-tier"); got != "–" {
		t.Errorf("on a refused origin the page shows tier %q, want none", got)
	}
	e.wantUpstreamCalls(t, calls)
	if !b.consoleHas("CORS") {
		t.Errorf("the browser logged no CORS refusal for %s; console:\n%s", refusedOrigin, b.consoleText())
	}
	b.screenshot("demo-refused-origin.png", false)
}

// pageServer is a server for the demo page, not yet started (see
// servePage), and its origin.
func pageServer() (*httptest.Server, string) {
	s := httptest.NewUnstartedServer(nil)
	return s, "http://" + s.Listener.Addr().String()
}

// servePage serves the demo page, calling e's proxy with key, from each
// of servers, which it starts.
func servePage(t *testing.T, e *env, key string, servers ...*httptest.Server) {
	t.Helper()
	page := demo.Handler(demo.Config{APIBase: e.caddy.URL, Key: key})
	for _, s := range servers {
		s.Config.Handler = page
		s.Start()
		t.Cleanup(s.Close)
	}
}

// openWorking loads the page of origin and asserts that it shows its
// key's usage, of tier "browser".
func (b *browser) openWorking(origin string) {
	b.t.Helper()
	b.navigate(origin + "/")
	b.waitIdle()
	if got := b.text("#usage-tier"); got != "browser" {
		b.t.Errorf("the page of %s shows tier %q, want browser (error: %q)", origin, got, b.text("#error-text"))
	}
}

// send asks the page's chat the prompt.
func (b *browser) send(prompt string) {
	b.t.Helper()
	b.eval(fmt.Sprintf(`document.getElementById("prompt").value = %q`, prompt))
	b.click("#send")
}

// findChromium returns Debian's Chromium, or skips the test where it is
// not installed (make test installs it; under CI its absence fails).
func findChromium(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err == nil {
		return chromiumPath
	}
	if p, err := exec.LookPath("chromium"); err == nil {
		return p
	}
	msg := "Chromium is not installed (" + chromiumPath + ", Debian package chromium); `make test-deps` installs it"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// browser is a headless Chromium with one tab, and what its console said.
type browser struct {
	t   *testing.T
	ctx context.Context

	mu      sync.Mutex
	console []string
}

// newBrowser starts Chromium with a fresh profile and the extra flags; it
// is stopped when the test ends, and nothing of it outlives 50 seconds.
func newBrowser(t *testing.T, path string, extra ...chromedp.ExecAllocatorOption) *browser {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 860),
	)
	opts = append(opts, extra...)
	bounded, cancelBound := context.WithTimeout(context.Background(), 50*time.Second)
	actx, cancelAlloc := chromedp.NewExecAllocator(bounded, opts...)
	ctx, cancelTab := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc() // waits for the browser to exit, before its profile is removed
		cancelBound()
	})
	b := &browser{t: t, ctx: ctx}
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("starting Chromium (%s): %v", path, err)
	}
	b.do("sizing the viewport", chromedp.EmulateViewport(1280, 900))
	messages := chromedp.Console(ctx)
	go func() {
		for m, err := range messages {
			if err != nil {
				return
			}
			b.mu.Lock()
			b.console = append(b.console, m.String())
			b.mu.Unlock()
		}
	}()
	return b
}

func (b *browser) do(what string, actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := chromedp.Do(b.ctx, actions...); err != nil {
		b.t.Fatalf("%s: %v\nconsole:\n%s", what, err, b.consoleText())
	}
}

func (b *browser) navigate(url string) {
	b.t.Helper()
	b.do("loading "+url, chromedp.Navigate(url))
}

func (b *browser) click(sel string) {
	b.t.Helper()
	b.do("clicking "+sel, chromedp.Click(chromedp.CSS(sel)))
}

// eval returns what a JavaScript expression gives, as a string.
func (b *browser) eval(expr string) string {
	b.t.Helper()
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[any](expr))
	if err != nil {
		b.t.Fatalf("evaluating %s: %v\nconsole:\n%s", expr, err, b.consoleText())
	}
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}

// await returns what a JavaScript promise resolves to, as a string.
func (b *browser) await(expr string) string {
	b.t.Helper()
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[any](expr, chromedp.EvalAwaitPromise))
	if err != nil {
		b.t.Fatalf("awaiting %s: %v\nconsole:\n%s", expr, err, b.consoleText())
	}
	return fmt.Sprint(v)
}

func (b *browser) text(sel string) string {
	b.t.Helper()
	return b.eval(fmt.Sprintf(`document.querySelector(%q).textContent.trim()`, sel))
}

func (b *browser) attr(sel, name string) string {
	b.t.Helper()
	return b.eval(fmt.Sprintf(`document.querySelector(%q).getAttribute(%q) || ""`, sel, name))
}

// waitIdle waits until the page has no request under way: its body's
// data-state is "idle" once it has answered and refreshed its figures.
func (b *browser) waitIdle() {
	b.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for b.eval(`document.body.dataset.state`) != "idle" {
		if time.Now().After(deadline) {
			b.t.Fatalf("the page is still %q after 15s\nconsole:\n%s", b.eval(`document.body.dataset.state`), b.consoleText())
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// watchStream polls the last answer until it is complete, and returns it
// with each distinct incomplete text seen on the way.
func (b *browser) watchStream(timeout time.Duration) (final string, partial []string) {
	b.t.Helper()
	const last = `(() => {
		const m = [...document.querySelectorAll("#messages .msg.assistant")].pop();
		if (!m) return "none|";
		const state = m.classList.contains("done") ? "done" : m.classList.contains("failed") ? "failed" : "streaming";
		return state + "|" + m.querySelector(".text").textContent;
	})()`
	deadline := time.Now().Add(timeout)
	for {
		state, text, _ := strings.Cut(b.eval(last), "|")
		switch state {
		case "done", "failed":
			return text, partial
		case "streaming":
			if text != "" && (len(partial) == 0 || partial[len(partial)-1] != text) {
				partial = append(partial, text)
			}
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("the answer was not complete after %v; it reads %q", timeout, text)
		}
		time.Sleep(30 * time.Millisecond)
	}
}

// wantError asserts the page shows the proxy's error of status and code.
func (b *browser) wantError(status, code string) {
	b.t.Helper()
	if b.attr("#error", "hidden") != "" || b.attr("#error", "data-status") != status || b.attr("#error", "data-code") != code {
		b.t.Errorf("the page's error is %s %s %q, want %s %s", b.attr("#error", "data-status"), b.attr("#error", "data-code"), b.text("#error-text"), status, code)
		return
	}
	if got := b.text("#error-text"); !strings.HasPrefix(got, status+" "+code+": ") {
		b.t.Errorf("the page's error reads %q, want it to start with %q and the proxy's message", got, status+" "+code)
	}
}

// screenshot saves the viewport as name in the test's artifact directory
// and, with update, as docs/name too.
func (b *browser) screenshot(name string, update bool) {
	b.t.Helper()
	png, err := chromedp.Run(b.ctx, chromedp.CaptureScreenshot())
	if err != nil {
		b.t.Fatalf("screenshot: %v", err)
	}
	path := filepath.Join(b.t.ArtifactDir(), name)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot: %s (kept with go test -artifacts)", path)
	if update {
		docs := filepath.Join("..", "docs", name)
		if err := os.MkdirAll(filepath.Dir(docs), 0o755); err != nil {
			b.t.Fatal(err)
		}
		if err := os.WriteFile(docs, png, 0o644); err != nil {
			b.t.Fatal(err)
		}
		b.t.Logf("screenshot: wrote %s", docs)
	}
}

func (b *browser) consoleText() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.console, "\n")
}

// consoleHas reports whether the console comes to hold s within a second:
// the browser's log entries arrive on their own.
func (b *browser) consoleHas(s string) bool {
	deadline := time.Now().Add(time.Second)
	for {
		if strings.Contains(b.consoleText(), s) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
