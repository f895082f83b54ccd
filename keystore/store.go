// Package keystore holds the proxy's client keys: their format, the stores
// that keep them (only as hashes), the in-memory index that identifies a
// caller without touching a store, the `caddy vigthoria` command and the
// admin API routes under /vigthoria/.
package keystore

import (
	"context"
	"errors"
	"time"

	"github.com/vigthoria/caddy-vigthoria/policy"
)

// Errors that callers branch on.
var (
	// ErrNotFound is returned when no key has the given ID.
	ErrNotFound = errors.New("no such key")

	// ErrRevoked is returned when a revoked key would be changed, such as
	// rotated: a revoked key stays revoked.
	ErrRevoked = errors.New("key is revoked")

	// ErrInvalid is policy.ErrInvalid: wrapped by the errors for a bad
	// name, tier, expiry, mint tier or settings given to Create or
	// SetSettings, so that callers can tell the user's mistakes from store
	// failures.
	ErrInvalid = policy.ErrInvalid
)

// Record is one client key as stored: never the secret, only its hash.
// Times are kept to the millisecond; Mint is sorted, without repeats.
// The zero Record is no key.
type Record struct {
	ID       string // "key_…", not secret
	Name     string
	Tier     string
	Hash     Hash
	Created  time.Time
	Expires  time.Time       // zero: never
	Revoked  time.Time       // zero: live
	LastUsed time.Time       // zero: never used
	Mint     []string        // tiers the key may mint tokens of (POST /vigthoria/tokens); nil: none
	Settings policy.Settings // the key's own limits, over its tier's
}

// Key states, as State reports them.
const (
	StateActive  = "active"
	StateRevoked = "revoked"
	StateExpired = "expired"
)

// State returns StateActive, StateRevoked or StateExpired at now. A key
// expires at the instant Expires, and revocation wins over expiry.
func (r Record) State(now time.Time) string {
	switch {
	case !r.Revoked.IsZero():
		return StateRevoked
	case !r.Expires.IsZero() && !now.Before(r.Expires):
		return StateExpired
	}
	return StateActive
}

// Store is where keys live. Implementations must be safe for concurrent
// use, and must tolerate other processes (the CLI, other Caddy instances)
// using the same store at the same time.
type Store interface {
	// Insert adds a new key.
	Insert(ctx context.Context, r Record) error

	// Get returns the key with the given ID, or ErrNotFound.
	Get(ctx context.Context, id string) (Record, error)

	// List returns every key, revoked and expired ones included, oldest
	// first.
	List(ctx context.Context) ([]Record, error)

	// SetHash replaces a key's hash, which rotates its secret. It returns
	// ErrNotFound for an unknown ID and ErrRevoked for a revoked key.
	SetHash(ctx context.Context, id string, h Hash) error

	// Revoke marks a key revoked at the given time. It returns ErrNotFound
	// for an unknown ID; revoking a revoked key changes nothing.
	Revoke(ctx context.Context, id string, at time.Time) error

	// SetSettings replaces a key's settings. It returns ErrNotFound for
	// an unknown ID and ErrRevoked for a revoked key. The settings must
	// be valid (Settings.Check).
	SetSettings(ctx context.Context, id string, s policy.Settings) error

	// Changes returns the keys inserted, rotated, revoked or given new
	// settings after cursor,
	// in the order of those changes, and the cursor to pass next time.
	// Cursor 0 returns every key. Last-used times are not changes: every
	// instance would otherwise reload every busy key every few seconds.
	Changes(ctx context.Context, cursor uint64) ([]Record, uint64, error)

	// TouchLastUsed raises the last-used times of the given keys (by ID)
	// in one write; unknown IDs are ignored, and a time is never lowered.
	TouchLastUsed(ctx context.Context, used map[string]time.Time) error

	// Close releases the store.
	Close() error
}
