// Package vigthoria is a Caddy HTTP handler that puts an authenticating,
// rate-limiting proxy in front of the Vigthoria API: callers use their own
// keys, the server key never leaves the server.
package vigthoria

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// DefaultMaxBody is the default limit of a request body: 10 MB.
const DefaultMaxBody = 10_000_000

// Handler proxies the Vigthoria API. It serves only the API's five
// endpoints under /v1 (chat/completions, completions, models, embeddings,
// usage); anything else is answered here and never reaches the upstream.
type Handler struct {
	// Base URL of the API, http or https, with an optional base path:
	// /v1/chat/completions on the proxy goes to <upstream>/chat/completions.
	// Default: https://api.vigthoria.io/v1
	Upstream string `json:"upstream,omitempty"`

	// The server-side Vigthoria API key, sent to the upstream as a bearer
	// token. Use a placeholder resolved at run time, such as
	// {env.VIGTHORIA_API_KEY} or {file./run/secrets/vigthoria}: a literal
	// key is stored in Caddy's config (GET /config/, autosave.json).
	// Required; the handler refuses to start when it resolves to empty.
	APIKey string `json:"api_key,omitempty"`

	// The largest request body accepted, in bytes. A larger body is
	// refused with 413 before it is read (from Content-Length) or as soon
	// as the limit is crossed. Default: 10000000 (10 MB).
	MaxBody int64 `json:"max_body,omitempty"`

	// How long to wait for the upstream's response headers. A non-streamed
	// completion sends its headers only when the whole answer is ready, so
	// keep this above the slowest answer you expect; a timeout is a 504.
	// Default: 0, no limit.
	HeaderTimeout caddy.Duration `json:"header_timeout,omitempty"`

	upstream *proxy.Upstream
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.vigthoria",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults, resolves the server key and loads the reverse
// proxy.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.Upstream == "" {
		h.Upstream = proxy.DefaultURL
	}
	if h.MaxBody == 0 {
		h.MaxBody = DefaultMaxBody
	}
	if h.APIKey != "" && !strings.Contains(h.APIKey, "{") {
		h.logger.Warn("api_key is a literal: it is stored in Caddy's config, readable through the admin API and autosave.json; use a placeholder such as {env.VIGTHORIA_API_KEY}")
	}
	// ReplaceAll, not ReplaceKnown: an unknown placeholder must resolve to
	// empty and fail here, not travel to the upstream as a literal.
	key := caddy.NewReplacer().ReplaceAll(h.APIKey, "")
	if key == "" {
		return errors.New("api_key resolves to an empty value: set it, e.g. api_key {env.VIGTHORIA_API_KEY} with VIGTHORIA_API_KEY in the environment")
	}
	up, err := proxy.New(ctx, proxy.Config{
		URL:           h.Upstream,
		APIKey:        key,
		HeaderTimeout: time.Duration(h.HeaderTimeout),
	})
	if err != nil {
		return fmt.Errorf("setting up the upstream: %w", err)
	}
	h.upstream = up
	return nil
}

// Validate checks the configuration after Provision.
func (h *Handler) Validate() error {
	if _, err := proxy.ParseURL(h.Upstream); err != nil {
		return err
	}
	if h.MaxBody < 0 {
		return fmt.Errorf("max_body must be positive, not %d", h.MaxBody)
	}
	if h.HeaderTimeout < 0 {
		return fmt.Errorf("header_timeout must be positive, not %s", time.Duration(h.HeaderTimeout))
	}
	return nil
}

// ServeHTTP runs the request through the pipeline: route, read the body,
// forward. Every refusal is answered here in the API's error shape.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	ep, apiErr := proxy.Route(r.Method, routePath(r))
	if apiErr != nil {
		apiErr.Write(w)
		return nil
	}
	if ep.Body {
		body, apiErr := proxy.ReadBody(r, h.MaxBody)
		if apiErr != nil {
			apiErr.Write(w)
			return nil
		}
		defer body.Release()
	}
	err := h.upstream.Forward(w, r, ep, next)
	if errors.As(err, &apiErr) {
		apiErr.Write(w)
		return nil
	}
	return err
}

// routePath is the path to route on: the escaped form when the client
// escaped anything (RawPath is set), so that /v1/chat%2Fcompletions is not
// taken for /v1/chat/completions.
func routePath(r *http.Request) string {
	if r.URL.RawPath != "" {
		return r.URL.RawPath
	}
	return r.URL.Path
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
