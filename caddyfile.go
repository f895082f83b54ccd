package vigthoria

import (
	"math"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	caddy.RegisterModule(Handler{})
	httpcaddyfile.RegisterHandlerDirective("vigthoria", parseCaddyfile)
	// After the authentication handlers, so that their identity is known;
	// before reverse_proxy, which it replaces for the API's routes.
	httpcaddyfile.RegisterDirectiveOrder("vigthoria", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	vigthoria {
//		upstream       <url>        # default https://api.vigthoria.io/v1
//		api_key        <value>      # required, e.g. {env.VIGTHORIA_API_KEY}
//		max_body       <size>       # default 10MB
//		header_timeout <duration>   # default none
//	}
//
// Each subdirective may appear once; unknown ones are errors.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.Errf("vigthoria takes no arguments on its line, got '%s'; use a block", d.Val())
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		name := d.Val()
		if seen[name] {
			return d.Errf("subdirective '%s' given twice", name)
		}
		seen[name] = true
		switch name {
		case "upstream":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			h.Upstream = v
		case "api_key":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			h.APIKey = v
		case "max_body":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			size, err := humanize.ParseBytes(v)
			if err != nil || size == 0 || size > math.MaxInt64 {
				return d.Errf("invalid max_body '%s': want a positive size such as 10MB", v)
			}
			h.MaxBody = int64(size)
		case "header_timeout":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return d.Errf("invalid header_timeout '%s': want a positive duration such as 5m", v)
			}
			h.HeaderTimeout = caddy.Duration(dur)
		default:
			return d.Errf("unknown subdirective '%s'", name)
		}
	}
	return nil
}

// singleArg returns the one argument of the current subdirective.
func singleArg(d *caddyfile.Dispenser) (string, error) {
	name := d.Val()
	if !d.NextArg() {
		return "", d.Errf("%s needs a value", name)
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.Errf("%s takes one value, got also '%s'", name, d.Val())
	}
	return v, nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
