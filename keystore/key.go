package keystore

import (
	"crypto/sha256"

	"github.com/vigthoria/caddy-vigthoria/keystore/clientkey"
)

// The shape of a key ID: idPrefix and idBodyLen random base62 characters.
const (
	idPrefix  = "key_"
	idBodyLen = 16
)

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

// IDLen is the length of a key ID, in bytes.
const IDLen = len(idPrefix) + idBodyLen

// NewID returns a new key ID: "key_" and 16 random base62 characters. An
// ID names a key in lists, logs and usage; it is not a secret.
func NewID() (string, error) {
	var b [len(idPrefix) + idBodyLen]byte
	copy(b[:], idPrefix)
	if err := clientkey.RandomBase62(b[len(idPrefix):]); err != nil {
		return "", err
	}
	return string(b[:]), nil
}
