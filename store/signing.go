package store

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
)

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
	return SigningKey{ID: string(id[:]), Private: priv, Created: StoredTime(now)}, nil
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

// SigningKeyFromSeed rebuilds a stored key. A seed of the wrong length
// (a damaged store) is an error that names the key, not the bytes.
func SigningKeyFromSeed(id string, seed []byte, created int64) (SigningKey, error) {
	if len(seed) != ed25519.SeedSize {
		return SigningKey{}, fmt.Errorf("signing key %s has a seed of %d bytes, not %d", id, len(seed), ed25519.SeedSize)
	}
	return SigningKey{ID: id, Private: ed25519.NewKeyFromSeed(seed), Created: FromMillis(created)}, nil
}

// CheckSigningKey refuses to store a key that could not be read back:
// no ID, or no whole private key. The error wraps ErrInvalid.
func CheckSigningKey(k SigningKey) error {
	if k.ID == "" {
		return fmt.Errorf("%w: a signing key needs an ID", ErrInvalid)
	}
	if len(k.Private) != ed25519.PrivateKeySize {
		return fmt.Errorf("%w: signing key %s has a private key of %d bytes, not %d", ErrInvalid, k.ID, len(k.Private), ed25519.PrivateKeySize)
	}
	return nil
}
