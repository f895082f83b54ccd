// Package dashboard is the operators' dashboard: the
// http.handlers.vigthoria_dashboard module, which serves one page (HTML,
// CSS and JavaScript embedded in the module, charts drawn by the
// vendored uPlot) and the JSON it reads and changes, over the key store
// and usage ledger of the vigthoria handlers of the same Caddy. It has no
// login of its own: Caddy's auth handlers come before it.
package dashboard

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"embed"
	"encoding/base64"
	"fmt"
	"html"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/sitehost"
	"github.com/vigthoria/caddy-vigthoria/policy"
)

//go:embed static
var files embed.FS

// DefaultUser is the placeholder that names the operator: what Caddy's
// basic_auth and most auth handlers set.
const DefaultUser = "{http.auth.user.id}"

// csrfSecret keys the CSRF tokens: random per process, so that a token
// works until Caddy restarts, across config reloads. A token is the HMAC
// of the operator's name and of a random nonce the visitor's browser
// holds in the csrfCookie: each visitor's is its own, and is of use only
// with that cookie (a signed double submit).
var csrfSecret = func() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return b
}()

// csrfCookie names the cookie of a visitor's CSRF nonce.
const csrfCookie = "vigthoria_csrf"

// Handler serves the dashboard: its page at the route's root and its
// JSON under api/, relative, so that it may live under any path prefix
// (handle_path /dashboard/*). Every answer forbids framing and inline
// scripts; every api/ request needs the page's CSRF token, and every
// change a same-origin JSON request as well.
type Handler struct {
	// Where client keys live, as for the vigthoria handler: "sqlite:<path>"
	// or "redis://…". Default: the default store,
	// sqlite:<Caddy data dir>/vigthoria/vigthoria.db. The tiers, prices
	// and limits shown are those of the vigthoria handler of this store.
	Store string `json:"store,omitempty"`

	// A placeholder naming the operator, set by the auth handler before
	// this one; CSRF tokens are bound to it. With forward_auth, name the
	// header it copies, e.g. {http.request.header.Remote-User}. Default:
	// {http.auth.user.id}.
	User string `json:"user,omitempty"`

	// Serve the JSON, key management included, to requests on which user
	// is empty, for a site that lets in only its operators by other means
	// (a remote_ip matcher, a VPN). Such requests are then the operator
	// "anonymous". Default: false, they get 403 and a warning in the log:
	// the dashboard hands out keys.
	AllowAnonymous bool `json:"allow_anonymous,omitempty"`

	// The dashboard's origin as browsers see it (scheme://host[:port]),
	// when a proxy in front of Caddy terminates TLS or changes the host:
	// a change must come from it, and its host is a name the dashboard
	// answers to. Default: the origin the request reached Caddy at.
	//
	// The dashboard answers only a Host that an operator named: an IP
	// address, localhost or a name under .localhost, a name of the
	// site's host matchers, or this origin's host; any other gets 421
	// (a page of another site whose name its DNS points at this server,
	// DNS rebinding, would otherwise read and change it as its own).
	Origin string `json:"origin,omitempty"`

	source  Source
	keys    *keys.Service
	spec    string
	release func() error
	logger  *zap.Logger
	index   []byte // index.html, its token placeholder to fill
	static  http.Handler
	live    *sampler

	originHost string       // the host of Origin; "" for none
	hostVetted atomic.Int32 // hostUnknown, or whether host matchers lead to h

	warned atomic.Bool // the warning of a request without a user is logged
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.vigthoria_dashboard",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision takes the store's shared key service and the vigthoria app.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.Origin != "" {
		if err := policy.CheckOrigin(h.Origin); err != nil {
			return err
		}
	}
	if h.User == "" {
		h.User = DefaultUser
	}
	app, err := ctx.App("vigthoria")
	if err != nil {
		return err
	}
	src, ok := app.(Source)
	if !ok {
		return fmt.Errorf("the vigthoria app (%T) cannot serve the dashboard", app)
	}
	h.source = src
	if h.keys, h.spec, h.release, err = src.KeyService(h.Store); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if h.index, err = files.ReadFile("static/index.html"); err != nil {
		return err
	}
	sub, _ := fs.Sub(files, "static") // the directory is embedded
	h.static = http.StripPrefix("/static", http.FileServerFS(sub))
	h.live = newSampler(src.Counters)
	if h.Origin != "" {
		u, err := url.Parse(h.Origin)
		if err != nil || u.Hostname() == "" {
			return fmt.Errorf("origin '%s' is not a web origin such as https://admin.example.com", h.Origin)
		}
		h.originHost = u.Hostname()
	}
	return nil
}

// Cleanup gives the key service back.
func (h *Handler) Cleanup() error {
	if h.release == nil {
		return nil
	}
	return h.release()
}

// The headers of every answer: no framing, no inline script or style,
// nothing sent to other sites.
var safetyHeaders = map[string]string{
	"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
		"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
	"X-Frame-Options":        "DENY",
	"X-Content-Type-Options": "nosniff",
	"Referrer-Policy":        "no-referrer",
}

// ServeHTTP serves the page, its files under static/ and its JSON under
// api/; nothing is passed on.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	for k, v := range safetyHeaders {
		w.Header().Set(k, v)
	}
	if !h.hostAllowed(r) {
		return writeError(w, http.StatusMisdirectedRequest, "the dashboard answers only the names its operator gave: an address, localhost, the site's host names or its origin option")
	}
	user, named := h.user(r)
	p := r.URL.Path
	if i := strings.Index(p, "/api/"); i >= 0 {
		if !named && !h.AllowAnonymous {
			return writeError(w, http.StatusForbidden, "no operator: put basic_auth, forward_auth or another auth handler before vigthoria_dashboard (or set allow_anonymous)")
		}
		return h.serveAPI(w, r, p[i+len("/api/"):], user)
	}
	if i := strings.Index(p, "/static/"); i >= 0 {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			return caddyhttp.Error(http.StatusMethodNotAllowed, nil)
		}
		r2 := r.Clone(r.Context())
		r2.URL.Path = p[i:]
		r2.URL.RawPath = ""
		w.Header().Set("Cache-Control", "no-cache")
		h.static.ServeHTTP(w, r2)
		return nil
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return caddyhttp.Error(http.StatusMethodNotAllowed, nil)
	}
	nonce := visitorNonce(r)
	if nonce == "" {
		b := make([]byte, nonceLen)
		_, _ = rand.Read(b) // never fails (crypto/rand)
		nonce = base64.RawURLEncoding.EncodeToString(b)
		http.SetCookie(w, &http.Cookie{Name: csrfCookie, Value: nonce, Path: "/", HttpOnly: true,
			SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil})
	}
	page := strings.Replace(string(h.index), "{{csrf}}", html.EscapeString(csrfToken(user, nonce)), 1)
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write([]byte(page))
	return nil
}

// user is the operator making r, or "anonymous" and false; the first
// request without one logs a warning.
func (h *Handler) user(r *http.Request) (string, bool) {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	var user string
	if repl != nil {
		user = repl.ReplaceAll(h.User, "")
	}
	if user != "" {
		return user, true
	}
	if !h.warned.Swap(true) {
		msg := "the dashboard is served without authentication: its JSON is refused; put basic_auth, forward_auth or another auth handler before vigthoria_dashboard (its user placeholder resolved to nothing)"
		if h.AllowAnonymous {
			msg = "the dashboard is served without authentication, to anyone its site lets in (allow_anonymous)"
		}
		h.logger.Warn(msg, zap.String("user", h.User))
	}
	return "anonymous", false
}

// nonceLen is the bytes of a visitor's CSRF nonce.
const nonceLen = 16

// visitorNonce is the CSRF nonce r's browser holds, or "" for none.
func visitorNonce(r *http.Request) string {
	c, err := r.Cookie(csrfCookie)
	if err != nil {
		return ""
	}
	if b, err := base64.RawURLEncoding.DecodeString(c.Value); err != nil || len(b) != nonceLen {
		return ""
	}
	return c.Value
}

// csrfToken is the CSRF token of user in the browser holding nonce:
// HMAC-SHA256 under the process's secret.
func csrfToken(user, nonce string) string {
	m := hmac.New(sha256.New, csrfSecret)
	m.Write([]byte(nonce))
	m.Write([]byte(user)) // the nonce has a fixed length: no ambiguity
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// checkRequest refuses, with the reason, an api/ request without user's
// CSRF token for its visitor, and a change that is not a same-origin
// JSON request.
func (h *Handler) checkRequest(r *http.Request, user string) (int, string) {
	got, nonce := r.Header.Get("X-CSRF-Token"), visitorNonce(r)
	if got == "" || nonce == "" || !hmac.Equal([]byte(got), []byte(csrfToken(user, nonce))) {
		return http.StatusForbidden, "missing or wrong X-CSRF-Token, or its cookie: reload the page"
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		return 0, ""
	}
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" {
		return http.StatusForbidden, "a change must come from the dashboard's own page (Sec-Fetch-Site)"
	}
	origin := h.Origin
	if origin == "" {
		origin = requestOrigin(r)
	}
	if r.Header.Get("Origin") != origin {
		return http.StatusForbidden, "a change must come from the dashboard's own origin (Origin)"
	}
	if r.Method != http.MethodDelete {
		ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";")
		if !strings.EqualFold(strings.TrimSpace(ct), "application/json") {
			return http.StatusUnsupportedMediaType, "send JSON: Content-Type: application/json"
		}
	}
	return 0, ""
}

// Values of Handler.hostVetted.
const (
	hostUnknown int32 = iota
	hostMatched
	hostUnmatched
)

// hostAllowed reports whether r's Host is one the operator named, so
// that no page of another name, which DNS points here, is served: an IP
// address or a localhost name (which browsers never ask DNS for), the
// origin option's host, or any Host when host matchers lead to h, Caddy
// having checked it against them.
func (h *Handler) hostAllowed(r *http.Request) bool {
	host := r.Host
	if name, _, err := net.SplitHostPort(host); err == nil {
		host = name
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	switch {
	case host == "", strings.EqualFold(host, "localhost"), hasSuffixFold(host, ".localhost"):
		return true
	case h.originHost != "" && strings.EqualFold(host, h.originHost):
		return true
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return true
	}
	return h.behindHostMatchers(r)
}

func hasSuffixFold(s, suffix string) bool {
	return len(s) >= len(suffix) && strings.EqualFold(s[len(s)-len(suffix):], suffix)
}

// behindHostMatchers reports whether every route of r's server that
// leads to h passes a host matcher: a site with names, or a handle with
// a host matcher. It is found once; the routes do not change while h
// lives.
func (h *Handler) behindHostMatchers(r *http.Request) bool {
	switch h.hostVetted.Load() {
	case hostMatched:
		return true
	case hostUnmatched:
		return false
	}
	srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok {
		return false
	}
	state := hostUnmatched
	if found, vetted := sitehost.Guarded(srv.Routes, h); found && vetted {
		state = hostMatched
	}
	h.hostVetted.Store(state)
	return state == hostMatched
}

// requestOrigin is the origin r was sent to: scheme://host[:port].
func requestOrigin(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
