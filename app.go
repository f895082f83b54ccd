package vigthoria

import (
	"sync"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App starts what the vigthoria handlers of a config share, such as their
// key stores, when Caddy runs the config: Caddy starts apps, but not when
// it only validates a config, so `caddy validate` opens and writes nothing.
// It has no configuration of its own; the handlers load it.
type App struct {
	mu       sync.Mutex // protects handlers
	handlers []*Handler
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "vigthoria",
		New: func() caddy.Module { return new(App) },
	}
}

// register makes h start with the app.
func (a *App) register(h *Handler) {
	a.mu.Lock()
	a.handlers = append(a.handlers, h)
	a.mu.Unlock()
}

// Start starts every registered handler's shared parts.
func (a *App) Start() error {
	a.mu.Lock()
	handlers := a.handlers
	a.mu.Unlock()
	for _, h := range handlers {
		if err := h.start(); err != nil {
			return err
		}
	}
	return nil
}

// Stop does nothing: what the handlers share outlives a config and is
// released by their Cleanup when no config uses it.
func (*App) Stop() error { return nil }

// Interface guards
var _ caddy.App = (*App)(nil)
