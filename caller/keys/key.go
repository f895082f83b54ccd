package keys

import (
	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
)

// The shape of a key ID: idPrefix and idBodyLen random base62 characters.
const (
	idPrefix  = "key_"
	idBodyLen = 16
)

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
