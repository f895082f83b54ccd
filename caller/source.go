package caller

import (
	"net/http"
	"net/netip"
	"time"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
)

// Namespace is the Caddy module namespace of identity sources: a module
// of it that implements Source is one, configured under the handler's
// "sources" and, in a Caddyfile, by `source <name> …`.
const Namespace = "http.handlers.vigthoria.sources"

// Request is what a source identifies a caller from.
type Request struct {
	HTTP *http.Request
	Addr netip.Addr // the caller's address, as Caddy determined it (trusted_proxies)
	Now  time.Time
}

// Bearer is the request's one bearer credential: false when it has none,
// or several Authorization headers. It costs a few comparisons and no
// allocation, so each source that reads it reads it again: a Request
// passed by value is not moved to the heap by the interface call.
func (q Request) Bearer() (string, bool) {
	return clientkey.FromAuthorization(q.HTTP.Header["Authorization"])
}

// A Verdict is what a source made of a request.
type Verdict uint8

const (
	// Pass: the request carries nothing this source reads; the next
	// source is asked.
	Pass Verdict = iota
	// Found: the caller, by a credential that only a script sends
	// (Authorization: Bearer); it is also the access log's user.
	Found
	// FoundAmbient: the caller, by what a browser sends by itself to any
	// site that asks (its address); it is also the access log's user.
	// Such callers are refused cross-site.
	FoundAmbient
	// FoundIdentity: the caller, named by another Caddy auth handler
	// (whose user it already is) from what a browser sends by itself,
	// such as a cookie: refused cross-site, as FoundAmbient.
	FoundIdentity
	// Refused: a credential of this source's kind that names no caller,
	// counted as a failed authentication.
	Refused
	// Unverifiable: a credential that could not be checked now (its
	// issuer's keys could not be fetched); refused, but not the caller's
	// failure.
	Unverifiable
)

// A Source names the caller of a request from one kind of credential.
// Identify returns the caller with a Found verdict; Pass when the
// request carries nothing of its kind; Refused or Unverifiable when it
// does and names no one, with the answer when it is not the one 401 of
// every failed authentication. It is on every request's path: it does no
// I/O it can avoid and allocates little.
type Source interface {
	Identify(q Request) (Client, Verdict, *api.Error)
}

// Ambient reports whether v found a caller by what a browser sends by
// itself, which another site's page can make it send.
func (v Verdict) Ambient() bool { return v == FoundAmbient || v == FoundIdentity }

// MaxIDLen bounds a caller's ID: an identity longer than this is refused,
// never cut (two users would share one ID).
const MaxIDLen = 128

// Sources are asked in order; the first that does not pass decides.
type Sources []Source

// Identify asks each source in turn. A request that none of them
// identified is Refused: nobody may call without a credential unless a
// source (such as the anonymous one) names such callers.
func (s Sources) Identify(q Request) (Client, Verdict, *api.Error) {
	for _, src := range s {
		if c, v, e := src.Identify(q); v != Pass {
			return c, v, e
		}
	}
	return Client{}, Refused, nil
}
