package vigthoria

import (
	"errors"
	"net/http"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/proxy"
)

func init() {
	caddy.RegisterModule(modelsAdmin{})
}

// modelsAdmin serves POST /vigthoria/models/purge on Caddy's admin API:
// the next GET /v1/models asks the upstream again.
type modelsAdmin struct{}

// CaddyModule returns the Caddy module information.
func (modelsAdmin) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.vigthoria_models",
		New: func() caddy.Module { return modelsAdmin{} },
	}
}

// Routes returns the admin routes.
func (modelsAdmin) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{
		Pattern: "/vigthoria/models/purge",
		Handler: caddy.AdminHandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			if r.Method != http.MethodPost {
				return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("use POST")}
			}
			proxy.PurgeModels()
			w.WriteHeader(http.StatusNoContent)
			return nil
		}),
	}}
}

// Interface guards
var _ caddy.AdminRouter = modelsAdmin{}
