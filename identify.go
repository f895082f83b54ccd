package vigthoria

import (
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/internal/sitehost"
	"github.com/vigthoria/caddy-vigthoria/policy"
)

// errInvalidKey is the one answer to every failed authentication: missing,
// malformed, unknown, revoked or expired keys all look the same, so that
// nothing tells a prober which it was.
var errInvalidKey = &api.Error{
	Status:  http.StatusUnauthorized,
	Type:    api.TypeInvalidRequest,
	Code:    "invalid_api_key",
	Message: "Incorrect or missing API key. Send your client key as: Authorization: Bearer <key>.",

	Authenticate: true,
}

var errKeyInQuery = &api.Error{
	Status:  http.StatusBadRequest,
	Type:    api.TypeInvalidRequest,
	Code:    "key_in_query",
	Message: "API keys are not accepted in the URL, where logs and browser histories keep them. Send your client key as: Authorization: Bearer <key>.",
}

var errTierNotConfigured = &api.Error{
	Status:  http.StatusForbidden,
	Type:    "permission_error",
	Code:    "tier_not_configured",
	Message: "This key's tier is not offered by this proxy. Ask its operator for a key of a configured tier.",
}

func errTooManyFailures(wait time.Duration) *api.Error {
	return &api.Error{
		Status:  http.StatusTooManyRequests,
		Type:    "rate_limit_error",
		Code:    "too_many_failed_auth",
		Message: "Too many failed authentications from your address; this credential is not valid either. Try again in " + strconv.Itoa(api.RetrySeconds(wait)) + " seconds.",

		RetryAfter: api.RetrySeconds(wait),
	}
}

// identify finds who is calling, asking the identity sources in order:
// an identity set by an earlier Caddy auth handler, a client key, a JWT
// of a configured issuer or minted here, then the sources configured
// under "sources" (the anonymous tier among them). It sets the
// placeholders and the access log's user_id.
//
// The failed-authentication throttle only ever refuses failed attempts: a
// valid key, an identity or an anonymous caller from a throttled address
// (everyone behind one NAT, office or CDN) is let through. Checking a key
// costs a checksum and, for a well-formed one, a hash and a lookup in
// memory, so a throttled prober gains nothing and costs little. A JWT
// costs a hash and a lookup too, and one signature check (tens of
// microseconds) when it names a configured issuer and a published key
// and was not seen before.
func (x *exchange) identify() (caller.Client, *policy.Tier, caller.Verdict, *api.Error) {
	if keyInQuery(x.r.URL.RawQuery) {
		return caller.Client{}, nil, caller.Refused, errKeyInQuery
	}
	addr := x.clientAddr()
	c, v, e := x.h.sources.Identify(caller.Request{HTTP: x.r, Addr: addr, Now: x.now})
	switch v {
	case caller.Refused:
		if e == nil {
			e = x.h.refuseAuth(addr, x.now, true)
		}
		return c, nil, v, e
	case caller.Unverifiable:
		return c, nil, v, x.h.refuseAuth(addr, x.now, false)
	}
	c, tier, e := x.admitTier(c, v != caller.FoundIdentity)
	return c, tier, v, e
}

// refuseAuth is the answer to a refused credential from addr: the one
// 401, or 429 once addr failed too often. It counts the failure when
// failed: a token whose issuer's keys could not be fetched is not the
// caller's.
func (h *Handler) refuseAuth(addr netip.Addr, now time.Time, failed bool) *api.Error {
	if wait, blocked := h.authFailures.Blocked(addr, now); blocked {
		return errTooManyFailures(wait)
	}
	if failed {
		h.authFailures.Fail(addr, now)
	}
	return errInvalidKey
}

// admitTier refuses a caller whose tier is not configured, and otherwise
// publishes who it is. The tier it returns is everything the caller is
// decided by: its tier with its key's own settings over it, or for the
// user of a minted token, its token's tier narrowed by the minting key's
// (see policy.Narrow).
func (x *exchange) admitTier(c caller.Client, setUser bool) (caller.Client, *policy.Tier, *api.Error) {
	h := x.h
	tier := h.policy.TierFor(c.Tier, c.Settings)
	if tier != nil && c.Minted != nil {
		// The minting key's tier and settings, read on every request, so
		// that a change reaches the tokens it minted before.
		if minter := h.policy.TierFor(c.Minted.KeyTier, h.keys.Settings(c.Minted.KeyID)); minter != nil {
			tier = h.policy.Narrow(tier, minter, c.Minted.Models, c.Minted.ModelsKey)
		} else {
			tier = nil
		}
	}
	if tier == nil {
		return c, nil, errTierNotConfigured
	}
	vars := &clientVars{client: c, user: setUser}
	x.r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer).Map(vars.replace)
	return c, tier, nil
}

// clientVars answers the placeholders naming an identified caller. One
// provider costs less than four Set calls, which grow the replacer's map
// past its first size on every request.
type clientVars struct {
	client caller.Client
	user   bool // also the access log's user_id, {http.auth.user.id}
}

func (v *clientVars) replace(key string) (any, bool) {
	switch key {
	case "http.vigthoria.client_id":
		return v.client.ID, true
	case "http.vigthoria.client_name":
		return v.client.Name, true
	case "http.vigthoria.tier":
		return v.client.Tier, true
	case "http.auth.user.id":
		return v.client.ID, v.user
	}
	return nil, false
}

// keyInQuery reports whether a query string seems to carry a credential:
// a client key or a JWT, percent-encoded or not, or a parameter named
// like one.
func keyInQuery(rawQuery string) bool {
	if rawQuery == "" {
		return false
	}
	if api.HasCredential(rawQuery) || api.HasCredential(api.PercentDecoded(rawQuery)) {
		return true
	}
	for param := range strings.SplitSeq(rawQuery, "&") {
		name, _, _ := strings.Cut(param, "=")
		switch strings.ToLower(name) {
		case "key", "api_key", "api-key", "apikey", "access_token", "token", "auth", "authorization":
			return true
		}
	}
	return false
}

// clientAddr is the caller's address as Caddy determined it, honouring
// the server's trusted_proxies; the anonymous tier and the failed-auth
// throttle count by it.
func (x *exchange) clientAddr() netip.Addr {
	r := x.r
	vars, _ := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	if !x.h.addrChecked.Load() && vars[caddyhttp.TrustedProxyVarKey] == true {
		x.checkChosenAddr()
	}
	if s, ok := vars[caddyhttp.ClientIPVarKey].(string); ok {
		if a, err := netip.ParseAddr(s); err == nil {
			return a
		}
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		return ap.Addr()
	}
	return netip.Addr{}
}

// checkChosenAddr warns, once, when r came through a trusted proxy of a
// server without trusted_proxies_strict: Caddy then takes the client's
// address from the left of X-Forwarded-For (client_ip_headers), which
// the caller writes, so that it chooses the address its anonymous limits
// and failed authentications are counted by. Whether a server has
// trusted_proxies is not exported by Caddy; the first request that came
// through one shows it.
func (x *exchange) checkChosenAddr() {
	h := x.h
	srv, ok := x.r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok || !h.addrChecked.CompareAndSwap(false, true) || srv.TrustedProxiesStrict > 0 {
		return
	}
	uses := "the failed-authentication throttle"
	if h.anonymousTier != "" {
		uses = "the anonymous tier's limits, " + uses
	}
	headers := strings.Join(srv.ClientIPHeaders, ", ")
	h.logger.Warn("callers can choose their client address: set trusted_proxies_strict in this server's options",
		zap.String("server", srv.Name()),
		zap.String("why", "the server trusts proxies (trusted_proxies) and takes the client's address from the left of "+headers+", which callers write"),
		zap.String("counted_by_address", uses))
}

// checkSiteNames warns, once, when a caller identified by what a browser
// sends by itself (its address, a cookie behind another auth handler)
// reaches the handler on a site without host names: Caddy then answers
// every Host, and a page of any name that DNS points at the server (DNS
// rebinding) is same-site to the browser, so the cross-site refusal does
// not stop it from spending its visitors' limits. A site with its names
// has Caddy refuse such a Host before the handler.
func (x *exchange) checkSiteNames() {
	h := x.h
	srv, ok := x.r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok || !h.namesChecked.CompareAndSwap(false, true) {
		return
	}
	if found, guarded := sitehost.Guarded(srv.Routes, h); !found || guarded {
		return
	}
	h.logger.Warn("callers identified by what browsers send by themselves (anonymous, identity) are served on a site without host names: give the site its names",
		zap.String("server", srv.Name()),
		zap.String("why", "a page of any name that DNS points at this server (DNS rebinding) is same-site to the browser and may spend its visitors' limits"))
}
