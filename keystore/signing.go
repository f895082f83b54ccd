package keystore

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"time"

	"github.com/vigthoria/caddy-vigthoria/keystore/clientkey"
)

// The shape of a signing key's ID: signingIDPrefix and signingIDBodyLen
// random base62 characters.
const (
	signingIDPrefix  = "sig_"
	signingIDBodyLen = 16
)

// SigningKey is a key the proxy signs minted tokens with (Ed25519). It lives
// in the store, so every instance of a fleet verifies what another minted.
//
// Printed with fmt or marshalled to JSON, a SigningKey shows its ID and
// Created only: the private key never reaches a log by accident.
type SigningKey struct {
	ID      string             // the tokens' kid: "sig_" + 16 base62 characters from crypto/rand; not secret
	Private ed25519.PrivateKey // secret: never logged, never printed
	Created time.Time          // to the millisecond
}

// NewSigningKey returns a fresh key created at now.
func NewSigningKey(now time.Time) (SigningKey, error) {
	var id [len(signingIDPrefix) + signingIDBodyLen]byte
	copy(id[:], signingIDPrefix)
	if err := clientkey.RandomBase62(id[len(signingIDPrefix):]); err != nil {
		return SigningKey{}, fmt.Errorf("creating a signing key ID: %w", err)
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return SigningKey{}, fmt.Errorf("creating a signing key: %w", err)
	}
	return SigningKey{ID: string(id[:]), Private: priv, Created: storedTime(now)}, nil
}

// String returns the key's ID, never its private key.
func (k SigningKey) String() string { return k.ID }

// GoString is String: %#v must not print the private key either.
func (k SigningKey) GoString() string { return k.ID }

// MarshalJSON writes the key's ID and Created, never its private key.
func (k SigningKey) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		ID      string    `json:"id"`
		Created time.Time `json:"created"`
	}{k.ID, k.Created})
}

// signingKeyFromSeed rebuilds a stored key. A seed of the wrong length
// (a damaged store) is an error that names the key, not the bytes.
func signingKeyFromSeed(id string, seed []byte, created int64) (SigningKey, error) {
	if len(seed) != ed25519.SeedSize {
		return SigningKey{}, fmt.Errorf("signing key %s has a seed of %d bytes, not %d", id, len(seed), ed25519.SeedSize)
	}
	return SigningKey{ID: id, Private: ed25519.NewKeyFromSeed(seed), Created: fromMillis(created)}, nil
}

// checkSigningKey refuses to store a key that could not be read back:
// no ID, or no whole private key. The error wraps ErrInvalid.
func checkSigningKey(k SigningKey) error {
	if k.ID == "" {
		return fmt.Errorf("%w: a signing key needs an ID", ErrInvalid)
	}
	if len(k.Private) != ed25519.PrivateKeySize {
		return fmt.Errorf("%w: signing key %s has a private key of %d bytes, not %d", ErrInvalid, k.ID, len(k.Private), ed25519.PrivateKeySize)
	}
	return nil
}

// MaxTokenTTL is the longest life of a minted token that any config may
// allow (max_token_ttl is checked against it). A signing key retired by a
// newer one still verifies for this long, then may be removed.
const MaxTokenTTL = 24 * time.Hour

// SigningKeyStore is a Store that keeps signing keys; SQLite and Redis both are.
type SigningKeyStore interface {
	// SigningKeys returns every signing key, oldest first (by Created, then ID).
	SigningKeys(ctx context.Context) ([]SigningKey, error)
	// AddSigningKey adds a key; an ID already stored is an error.
	AddSigningKey(ctx context.Context, k SigningKey) error
	// RemoveSigningKey deletes a key; an unknown ID is no error.
	RemoveSigningKey(ctx context.Context, id string) error
}

// signingGrace is how long a new signing key is published before it
// signs: every instance of a fleet reads the store's signing keys at
// least every second, so none meets a token of a key it does not know.
const signingGrace = 2 * time.Second

// Retired returns when key i of keys (oldest first, as SigningKeys returns
// them) stopped signing: signingGrace after the Created of the next newer
// key; zero for the newest.
func Retired(keys []SigningKey, i int) time.Time {
	if i+1 >= len(keys) {
		return time.Time{}
	}
	return keys[i+1].Created.Add(signingGrace)
}

// signer returns the key of keys (oldest first) that signs at now: the
// newest created signingGrace ago or earlier; while none is that old,
// the oldest, so that instances that made a store's first keys at once
// sign with the same one.
func signer(keys []SigningKey, now time.Time) *SigningKey {
	for i := len(keys) - 1; i >= 0; i-- {
		if !now.Before(keys[i].Created.Add(signingGrace)) {
			return &keys[i]
		}
	}
	if len(keys) == 0 {
		return nil
	}
	return &keys[0]
}

// expiredSigningKey reports whether key i of keys was retired more than
// MaxTokenTTL before now: no token it signed is valid any more, and it
// may be removed.
func expiredSigningKey(keys []SigningKey, i int, now time.Time) bool {
	retired := Retired(keys, i)
	return !retired.IsZero() && now.Sub(retired) > MaxTokenTTL
}

// rotateSigningKeys adds a new signing key to st, created at now, and
// removes the keys retired more than MaxTokenTTL before now: no token
// they signed can still be valid. It returns the new key and how many
// it removed.
func rotateSigningKeys(ctx context.Context, st SigningKeyStore, now time.Time) (SigningKey, int, error) {
	k, err := NewSigningKey(now)
	if err != nil {
		return SigningKey{}, 0, err
	}
	if err := st.AddSigningKey(ctx, k); err != nil {
		return SigningKey{}, 0, err
	}
	keys, err := st.SigningKeys(ctx)
	if err != nil {
		return k, 0, err
	}
	removed := 0
	for i, old := range keys {
		if expiredSigningKey(keys, i, now) {
			if err := st.RemoveSigningKey(ctx, old.ID); err != nil {
				return k, removed, err
			}
			removed++
		}
	}
	return k, removed, nil
}
