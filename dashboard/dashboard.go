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
	"net/http"
	"strings"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/keystore"
)

//go:embed static
var files embed.FS

// DefaultUser is the placeholder that names the operator: what Caddy's
// basic_auth and most auth handlers set.
const DefaultUser = "{http.auth.user.id}"

// csrfSecret keys the CSRF tokens: random per process, so that a token
// works until Caddy restarts, across config reloads.
var csrfSecret = func() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return b
}()

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
	// a change must come from it. Default: the origin the request reached
	// Caddy at.
	Origin string `json:"origin,omitempty"`

	source  Source
	keys    *keystore.Service
	spec    string
	release func() error
	logger  *zap.Logger
	index   []byte // index.html, its token placeholder to fill
	static  http.Handler
	live    *sampler

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
		if err := keystore.CheckOrigin(h.Origin); err != nil {
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
	page := strings.Replace(string(h.index), "{{csrf}}", html.EscapeString(csrfToken(user)), 1)
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

// csrfToken is the CSRF token of user: HMAC-SHA256 of the process's
// secret.
func csrfToken(user string) string {
	m := hmac.New(sha256.New, csrfSecret)
	m.Write([]byte(user))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// checkRequest refuses, with the reason, an api/ request without user's
// CSRF token, and a change that is not a same-origin JSON request.
func (h *Handler) checkRequest(r *http.Request, user string) (int, string) {
	got := r.Header.Get("X-CSRF-Token")
	if got == "" || !hmac.Equal([]byte(got), []byte(csrfToken(user))) {
		return http.StatusForbidden, "missing or wrong X-CSRF-Token"
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
