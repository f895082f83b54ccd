// Package caller says who is calling: the Client a request is decided
// and charged as, and the Source interface through which each kind of
// credential (a client key, a JWT of an OpenID provider or minted here,
// an identity from another Caddy auth handler, none at all) names one.
// Sources register here (Register) and Identify asks them in order.
//
// It may import api, policy and the standard library; the sources'
// packages import it.
package caller

import "github.com/vigthoria/caddy-vigthoria/policy"

// Client is an identified caller.
type Client struct {
	ID   string // the key ID, "key_…", or another identity set by the caller's code
	Name string
	Tier string
	// Minted is set for the user of a token the proxy minted; nil for
	// other callers.
	Minted *Minted
	// Settings are the key's own limits over its tier's; nil for a key
	// without any and for callers without a key. Never changed: a change
	// of a key's settings gives its next requests a new pointer.
	Settings *policy.Settings
}

// Minted is what a minted token gives its user beyond its tier. The
// minting key's own limits bound all its users together.
type Minted struct {
	KeyID   string   // the key that minted the token
	KeyTier string   // that key's tier
	Models  []string // globs that narrow the tier's models; nil: the tier's
	// ModelsKey names the set of Models, made once per token for the
	// caches of the policies it narrows; "" for none.
	ModelsKey string
}
