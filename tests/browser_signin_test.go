package tests

import (
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/demo"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// tokenTTL is the life of the tokens the page's backend mints in
// TestBrowserSignedInUser: short, so that the test sees them renewed.
const tokenTTL = 3 * time.Second

// seen is what the signed-in test saw pass: the tokens the backend
// handed out and the bearers of the page's API calls, with their times.
type seen struct {
	mu    sync.Mutex
	mints []seenMint
	calls []seenCall
}

type seenMint struct {
	at time.Time
	mintedToken
}

type seenCall struct {
	at     time.Time
	path   string
	bearer string
}

func (s *seen) mintsSoFar() []seenMint {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.mints)
}

func (s *seen) callsSoFar() []seenCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

// TestBrowserSignedInUser drives the demo page's "Signed-in user" mode in
// headless Chromium. The page is served for that mode only, with the
// app's backend beside it on the same origin, and holds no client key:
// the user signs in by name, the backend exchanges its minting key for a
// token for her, and the page calls the proxy across origins with the
// token. Her answer streams, the usage card shows her caller ID
// mint:<key ID>:alice, and the page renews the short-lived token before
// it expires, so that every call it makes, the chat after the first
// token's expiry included, carries a token that has not expired. Bob,
// signed in after her, has limits of his own.
// It saves a screenshot as docs/demo-signed-in.png when
// VIGTHORIA_UPDATE_SCREENSHOT=1.
func TestBrowserSignedInUser(t *testing.T) {
	chromium := findChromium(t)
	site := httptest.NewUnstartedServer(nil)
	origin := "http://" + site.Listener.Addr().String()

	e := start(t, "cors "+origin, browserTier)
	e.upstream.SetBehavior(standin.Behavior{ChunkDelay: 60 * time.Millisecond})
	keyID, mintKey := e.addKey(t, "pro", "--mint", "browser")
	e.mintWhenKnown(t, mintKey, map[string]any{"user": "probe", "tier": "browser"})

	// The page calls the proxy through a recorder of the bearer of each
	// call, which the page's origin does not see: CORS is the proxy's.
	var s seen
	caddyURL, _ := url.Parse(e.caddy.URL)
	api := httptest.NewServer(&httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(caddyURL)
			if auth := r.In.Header.Get("Authorization"); auth != "" {
				s.mu.Lock()
				s.calls = append(s.calls, seenCall{time.Now(), r.In.URL.Path, strings.TrimPrefix(auth, "Bearer ")})
				s.mu.Unlock()
			}
		},
		FlushInterval: -1,
	})
	t.Cleanup(api.Close)

	backend := demo.Backend(demo.BackendConfig{APIBase: e.caddy.URL, MintKey: mintKey, Tier: "browser", TTL: tokenTTL})
	mux := http.NewServeMux()
	mux.HandleFunc(demo.TokenPath, func(w http.ResponseWriter, r *http.Request) {
		rec := httptest.NewRecorder()
		backend.ServeHTTP(rec, r)
		var m mintedToken
		if json.Unmarshal(rec.Body.Bytes(), &m) == nil && m.Token != "" {
			s.mu.Lock()
			s.mints = append(s.mints, seenMint{time.Now(), m})
			s.mu.Unlock()
		}
		maps.Copy(w.Header(), rec.Header())
		w.WriteHeader(rec.Code)
		w.Write(rec.Body.Bytes())
	})
	mux.Handle("/", demo.Handler(demo.Config{APIBase: api.URL, SignIn: true}))
	site.Config.Handler = mux
	site.Start()
	t.Cleanup(site.Close)

	wantNoKey := func(what, text string) {
		t.Helper()
		if strings.Contains(text, "vgt_") || strings.Contains(text, mintKey) {
			t.Errorf("%s holds a client key: %s", what, text)
		}
	}
	res, err := http.Get(origin + "/config.js")
	if err != nil {
		t.Fatal(err)
	}
	config, _ := io.ReadAll(res.Body)
	res.Body.Close()
	wantNoKey("config.js", string(config))

	b := newBrowser(t, chromium)
	b.navigate(origin + "/")
	b.waitIdle()
	if got := b.eval(`[document.getElementById("who").hidden, document.getElementById("mode-key").disabled].join()`); got != "false,true" {
		t.Errorf("the page's mode switch is hidden, the demo key's mode disabled: %s, want it shown, without a key to use", got)
	}
	b.click("#mode-user")
	b.waitIdle()
	if b.eval(`document.getElementById("send").disabled`) != "true" {
		t.Error("the page lets a chat go before anyone signed in")
	}

	b.eval(`document.getElementById("user-name").value = "alice"`)
	b.click("#sign-in-button")
	b.waitIdle()
	if got := b.text("#session-user"); got != "alice" {
		t.Fatalf("the page is signed in as %q, want alice (error: %q)", got, b.text("#error-text"))
	}
	if b.eval(`getComputedStyle(document.getElementById("sign-in")).display`) != "none" {
		t.Error("the sign-in form is still shown once alice signed in")
	}
	if got, want := b.text("#usage-client"), "mint:"+keyID+":alice"; got != want {
		t.Errorf("the usage card shows the caller %q, want %q", got, want)
	}
	if got := b.text("#usage-tier"); got != "browser" {
		t.Errorf("the usage card shows tier %q, want the minted token's tier browser", got)
	}
	mints := s.mintsSoFar()
	if len(mints) != 1 || mints[0].User != "alice" || mints[0].Tier != "browser" {
		t.Fatalf("the backend minted %+v, want one token for alice of tier browser", mints)
	}
	first := mints[0]
	firstExpiry := time.Unix(first.ExpiresAt, 0)
	if got := b.attr("#session", "data-expires"); got != strconv.FormatInt(first.ExpiresAt, 10) {
		t.Errorf("the page shows a token expiring at %s, want %d", got, first.ExpiresAt)
	}

	// Her chat streams, with her token.
	b.eval(`document.getElementById("prompt").value = "Hello as alice"`)
	b.click("#send")
	final, partial := b.watchStream(15 * time.Second)
	if want := standin.Answer(standin.DefaultMaxTokens); final != want {
		t.Fatalf("the page shows the answer %q, want %q (error: %q)", final, want, b.text("#error-text"))
	}
	if len(partial) < 3 {
		t.Errorf("saw the answer grow %d times before it was complete, want at least 3: it did not stream", len(partial))
	}
	b.waitIdle()
	e.wantNoClientSecrets(t, e.lastRequest(t))

	// No key anywhere in the page: its DOM, its globals, its storage.
	wantNoKey("the DOM", b.eval(`document.documentElement.outerHTML`))
	wantNoKey("the page's globals", b.eval(`Object.keys(window).map(k => {
		try { return k + "=" + (typeof window[k] === "function" ? "" : JSON.stringify(window[k])); } catch (_) { return k; }
	}).join("\n")`))
	wantNoKey("the page's storage", b.eval(`JSON.stringify([localStorage, sessionStorage])`))

	// The token is renewed before it expires, with no call to prompt it,
	// and a chat after the first token's expiry goes with a new one.
	time.Sleep(time.Until(firstExpiry) + 300*time.Millisecond)
	mints = s.mintsSoFar()
	if len(mints) < 2 || !mints[1].at.Before(firstExpiry) {
		at := make([]string, len(mints))
		for i, m := range mints {
			at[i] = m.at.Format(time.StampMilli)
		}
		t.Fatalf("the page fetched tokens at %v: want a second one before the first expired at %v", at, firstExpiry.Format(time.StampMilli))
	}
	b.eval(`document.getElementById("prompt").value = "Still there?"`)
	b.click("#send")
	if final, _ := b.watchStream(15 * time.Second); final != standin.Answer(standin.DefaultMaxTokens) {
		t.Fatalf("the chat after the first token expired shows %q (error: %q)", final, b.text("#error-text"))
	}
	b.waitIdle()

	expiry := map[string]time.Time{}
	for _, m := range s.mintsSoFar() {
		expiry[m.Token] = time.Unix(m.ExpiresAt, 0)
	}
	calls := s.callsSoFar()
	chats := 0
	for _, c := range calls {
		exp, minted := expiry[c.bearer]
		switch {
		case !minted:
			t.Errorf("the page called %s with a bearer the backend did not mint", c.path)
		case !c.at.Before(exp):
			t.Errorf("the page called %s at %v with a token that expired at %v", c.path, c.at.Format(time.StampMilli), exp)
		}
		if c.path == "/v1/chat/completions" {
			chats++
			if c.at.After(firstExpiry) && c.bearer == first.Token {
				t.Error("the chat after the first token's expiry carried that token")
			}
		}
	}
	if chats != 2 {
		t.Errorf("the recorder saw %d chats from the page, want 2", chats)
	}
	if got := b.text("#usage-client"); got != "mint:"+keyID+":alice" {
		t.Errorf("after the renewals the usage card shows the caller %q, want alice's", got)
	}
	b.screenshot("demo-signed-in.png", os.Getenv("VIGTHORIA_UPDATE_SCREENSHOT") == "1")

	// Bob, signed in after her, has his own limits: the whole burst of
	// his tier, whatever alice spent (the page's look at his usage counts
	// in a bucket of its own).
	b.click("#sign-out")
	b.waitIdle()
	b.eval(`document.getElementById("user-name").value = "bob"`)
	b.click("#sign-in-button")
	b.waitIdle()
	if got, want := b.text("#usage-client"), "mint:"+keyID+":bob"; got != want {
		t.Errorf("signed in as bob, the usage card shows the caller %q, want %q", got, want)
	}
	if got := b.attr("#usage-requests", "data-value"); got != "10" {
		t.Errorf("bob has %q requests left, want his own 10", got)
	}
	b.click("#burst")
	b.waitIdle()
	log := b.eval(`[...document.querySelectorAll("#burst-log li")].map(li => li.className).join()`)
	if want := strings.Repeat("ok,", 10) + "refused"; log != want {
		t.Errorf("bob's burst went %s, want %s", log, want)
	}
	b.wantError("429", "rate_limit_exceeded")
}
