// Package header is the identity source of callers that an earlier Caddy
// auth handler identified: a placeholder, such as {http.auth.user.id},
// names the caller, and a tier name or placeholder its tier.
//
// It imports caller, api and Caddy.
package header

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller"
)

// Prefix names callers found by identity, so that they never collide with
// a key ID (key_…) in limits and usage.
const Prefix = "user:"

var errIdentityTooLong = &api.Error{
	Status:  http.StatusBadRequest,
	Type:    api.TypeInvalidRequest,
	Code:    "identity_too_long",
	Message: "The identity your authentication gave is longer than the " + strconv.Itoa(caller.MaxIDLen) + " characters this proxy accepts.",
}

// Source names the caller by Identity, a placeholder, and its tier by
// Tier, a tier name or a placeholder.
type Source struct {
	Identity string
	Tier     string
}

// Identify names the caller when Identity resolves to a value.
func (s *Source) Identify(q caller.Request) (caller.Client, caller.Verdict, *api.Error) {
	repl := q.HTTP.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	// ReplaceAll: an auth handler that let the request through without a
	// user leaves its placeholder unknown, which must name nobody, not
	// one user "{http.auth.user.id}".
	id := repl.ReplaceAll(s.Identity, "")
	if id == "" {
		return caller.Client{}, caller.Pass, nil
	}
	if len(id) > caller.MaxIDLen {
		// Never another caller's limits: not anonymous, not a key's.
		return caller.Client{}, caller.Refused, errIdentityTooLong
	}
	tier := s.Tier
	if strings.Contains(tier, "{") {
		tier = repl.ReplaceKnown(tier, "")
	}
	return caller.Client{ID: Prefix + id, Name: id, Tier: tier}, caller.FoundIdentity, nil
}
