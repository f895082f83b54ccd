package alerts

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strconv"
	"strings"
	"time"
)

// secretPrefix starts a Standard Webhooks secret; base64 of its bytes
// follows.
const secretPrefix = "whsec_"

// minSecretBytes is the shortest secret accepted: the spec asks for
// 24 to 64 bytes.
const minSecretBytes = 24

// ErrSecret is returned for a secret that is not "whsec_" followed by
// the standard base64 of at least 24 bytes. It never repeats the secret.
var ErrSecret = errors.New("webhook secret must be whsec_ followed by the base64 of 24 to 64 random bytes, as in Standard Webhooks")

// Secret is a webhook signing key. Printed, it shows nothing of itself.
type Secret struct{ key []byte }

// ParseSecret reads a "whsec_…" secret.
func ParseSecret(s string) (Secret, error) {
	enc, ok := strings.CutPrefix(s, secretPrefix)
	if !ok {
		return Secret{}, ErrSecret
	}
	key, err := base64.StdEncoding.DecodeString(enc)
	if err != nil || len(key) < minSecretBytes || len(key) > 64 {
		return Secret{}, ErrSecret
	}
	return Secret{key: key}, nil
}

// String hides the secret.
func (Secret) String() string { return "whsec_(hidden)" }

// GoString hides the secret from %#v too.
func (s Secret) GoString() string { return s.String() }

// Sign returns the webhook-signature header value of a message:
// "v1," and the base64 HMAC-SHA256 of "<id>.<timestamp>.<body>", the
// timestamp in unix seconds.
func (s Secret) Sign(id string, at time.Time, body []byte) string {
	mac := hmac.New(sha256.New, s.key)
	mac.Write([]byte(id))
	mac.Write([]byte{'.'})
	mac.Write(strconv.AppendInt(nil, at.Unix(), 10))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
}
