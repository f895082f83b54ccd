// Package store is where the proxy's state persists: one Backend
// interface that every backend implements whole, the registry that opens
// a backend by its spec, and the persisted types (Record, Hash, UsageRow,
// UsageBatch, RefusalRow, SigningKey) with the names of the ledger's days,
// hours and 5-minute slots. Each backend (store/sqlite, store/redis) owns
// its schema or key layout, scripts and client, and registers itself.
//
// It may import the standard library, policy (a key's settings are
// stored with it) and caller/clientkey.
package store

import (
	"context"
	"crypto/sha256"
	"errors"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
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

	// ErrReset is returned by Changes when the store no longer holds
	// the history that the cursor points into: a Redis emptied or restored
	// from an older copy. The caller must start again from cursor 0, and
	// drop what it learned before.
	ErrReset = errors.New("the key store lost its history (emptied, or restored from an older copy)")
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

// Backend is a store: where keys, the usage ledger, signing keys and
// alert claims live. Every backend implements all of it (a missing method
// is a compile error, by the backend's `var _ store.Backend` guard), so
// callers never ask a backend what it can do. Implementations must be
// safe for concurrent use, and must tolerate other processes (the CLI,
// other Caddy instances) using the same store at the same time.
type Backend interface {
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

	// CountKeys returns how many keys the store holds, so that a first
	// load can size the index once.
	CountKeys(ctx context.Context) (int, error)

	// LoadAll calls f with every key, batch at a time, and returns the
	// cursor to pass to Changes next.
	LoadAll(ctx context.Context, batch int, f func([]Record)) (cursor uint64, err error)

	// AddUsage adds the batch's rows to the stored ones, in one
	// transaction, once: a batch of the writer's that is not newer than
	// the last applied is ignored. Rows that can never be stored are
	// left out and returned in a *RefusedError, the rest written; any
	// other error leaves the batch to be written again as it is.
	AddUsage(ctx context.Context, b UsageBatch) error

	// UsageSince returns the client's daily rows of day and later.
	UsageSince(ctx context.Context, client, day string) ([]UsageRow, error)

	// UsageHours returns the hourly rows (Day holding the hour) of hour
	// and later, of every client when client is "", else of that client.
	UsageHours(ctx context.Context, client, hour string) ([]UsageRow, error)

	// RefusalHours returns the refusal rows of hour and later, of every
	// client when client is "", else of that client.
	RefusalHours(ctx context.Context, client, hour string) ([]RefusalRow, error)

	// UsageSlots returns the 5-minute rows (Day holding the slot) of slot
	// and later, of every client when client is "", else of that client.
	UsageSlots(ctx context.Context, client, slot string) ([]UsageRow, error)

	// RefusalSlots returns the refusal rows by 5-minute slot (Hour
	// holding the slot) of slot and later, of every client when client
	// is "", else of that client.
	RefusalSlots(ctx context.Context, client, slot string) ([]RefusalRow, error)

	// SigningKeys returns every signing key of minted tokens, oldest
	// first (by Created, then ID).
	SigningKeys(ctx context.Context) ([]SigningKey, error)

	// AddSigningKey adds a key; an ID already stored is an error.
	AddSigningKey(ctx context.Context, k SigningKey) error

	// RemoveSigningKey deletes a key; an unknown ID is no error.
	RemoveSigningKey(ctx context.Context, id string) error

	// ClaimAlert reports true to the first caller to claim id, whichever
	// process it is in, and false to every later one until the claim
	// expires at until (to the millisecond): each alert is sent by one
	// instance of a fleet only.
	ClaimAlert(ctx context.Context, id string, until time.Time) (bool, error)

	// Close releases the store.
	Close() error
}

// Hash is the SHA-256 of a whole client key, the only form in which a key
// is stored.
type Hash [32]byte

// HashSecret returns the hash under which the key s is stored. It does
// not allocate for a string of a key's length.
func HashSecret(s string) Hash {
	// Copying into an array keeps the conversion to bytes on the stack.
	var buf [clientkey.Len]byte
	if len(s) == clientkey.Len {
		copy(buf[:], s)
		return sha256.Sum256(buf[:])
	}
	return sha256.Sum256([]byte(s))
}
