// Package policy owns what a caller may do: the tiers and their limits;
// a key's own Settings (rates, concurrency, quota, budget, models,
// max_tokens, origins), how they are written, parsed and patched, and
// merged over its tier; a minted token's tier narrowed by the key that
// minted it; money in micro-units and prices; model globs and web
// origins; the shares of buffered bodies; and the policing of a
// request's body (its model and its output cap). It is one
// representation of limits for the root, the stores and the dashboard.
// It decides; it never writes HTTP.
//
// It may import limiter, proxy (for the body shares and a request's
// call), proxy/wire, api, Caddy's durations and internal helpers; never
// store, ledger, caller or admission.
package policy

import "errors"

// ErrInvalid is wrapped by the errors for settings that Settings.Check
// refuses, and by the key stores' errors for a bad name, tier, expiry or
// mint tier, so that callers can tell the user's mistakes from store
// failures.
var ErrInvalid = errors.New("invalid key attributes")
