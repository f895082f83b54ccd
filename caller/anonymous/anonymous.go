// Package anonymous is the identity source of callers without any
// credentials: with neither an Authorization header nor another source's
// identity, a caller is named by its address (IPv6 by /64) and given one
// tier. It is registered as the Caddy module
// http.handlers.vigthoria.sources.anonymous; the handler's own
// "anonymous <tier>" option configures the same source.
//
// It imports caller, limiter (for the address buckets) and Caddy.
package anonymous

import (
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/limiter"
)

func init() {
	caddy.RegisterModule(Source{})
}

// Prefix names anonymous callers, so that they never collide with a key
// ID (key_…) in limits and usage.
const Prefix = "ip:"

// Source gives callers without credentials a tier, each address bucket
// its own caller.
type Source struct {
	// The tier of callers without any credentials. Required.
	Tier string `json:"tier,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Source) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  caller.Namespace + ".anonymous",
		New: func() caddy.Module { return new(Source) },
	}
}

// Identify names a request without an Authorization header by its
// address bucket.
func (s *Source) Identify(q caller.Request) (caller.Client, caller.Verdict, *api.Error) {
	if len(q.HTTP.Header["Authorization"]) > 0 {
		return caller.Client{}, caller.Pass, nil
	}
	return caller.Client{ID: Prefix + limiter.AddrBucket(q.Addr).String(), Tier: s.Tier}, caller.FoundAmbient, nil
}

// UnmarshalCaddyfile reads `source anonymous <tier>` from the source's
// name on.
func (s *Source) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the source's name
	if !d.NextArg() {
		return d.ArgErr()
	}
	s.Tier = d.Val()
	if d.NextArg() || d.NextBlock(d.Nesting()) {
		return d.Err("source anonymous takes one tier name")
	}
	return nil
}

// Interface guards
var (
	_ caller.Source         = (*Source)(nil)
	_ caddyfile.Unmarshaler = (*Source)(nil)
)
