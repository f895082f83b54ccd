package dashboard

import (
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	vigthoria_dashboard {
//		store sqlite [<path>] | redis <url>   # default: the default store
//		user  <placeholder>                   # default {http.auth.user.id}
//		allow_anonymous                       # serve requests without an operator
//		origin <scheme://host[:port]>         # as browsers see it; default the request's
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		name := d.Val()
		if seen[name] {
			return d.Errf("repeated subdirective '%s'", name)
		}
		seen[name] = true
		args := d.RemainingArgs()
		switch name {
		case "store":
			var ok bool
			if h.Store, ok = store.SpecFromArgs(args); !ok {
				return d.Errf("store takes 'sqlite [<path>]' or 'redis <url>', got '%s'", strings.Join(args, " "))
			}
		case "user":
			if len(args) != 1 {
				return d.Errf("user takes one placeholder, got '%s'", strings.Join(args, " "))
			}
			h.User = args[0]
		case "allow_anonymous":
			if len(args) != 0 {
				return d.Errf("allow_anonymous takes no value, got '%s'", strings.Join(args, " "))
			}
			h.AllowAnonymous = true
		case "origin":
			if len(args) != 1 {
				return d.Errf("origin takes one web origin such as https://admin.example.com, got '%s'", strings.Join(args, " "))
			}
			if err := policy.CheckOrigin(args[0]); err != nil {
				return d.Err(err.Error())
			}
			h.Origin = args[0]
		default:
			return d.Errf("unknown subdirective '%s'", name)
		}
	}
	return nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
