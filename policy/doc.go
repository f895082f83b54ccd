// Package policy holds what limits a caller: a key's Settings (rates,
// concurrency, quota, budget, models, max_tokens, origins), how they are
// written and parsed, money in micro-units, model globs and web origins.
// It is one representation of limits for the root, the stores and the
// dashboard.
//
// It may import the standard library, Caddy's duration parsing,
// proxy/wire and internal helpers; never store, ledger or keys.
package policy

import "errors"

// ErrInvalid is wrapped by the errors for settings that Settings.Check
// refuses, and by the key stores' errors for a bad name, tier, expiry or
// mint tier, so that callers can tell the user's mistakes from store
// failures.
var ErrInvalid = errors.New("invalid key attributes")
