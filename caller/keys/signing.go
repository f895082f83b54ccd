package keys

import (
	"context"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// The shape of a signing key's ID: signingIDPrefix and signingIDBodyLen
// random base62 characters.
// MaxTokenTTL is the longest life of a minted token that any config may
// allow (max_token_ttl is checked against it). A signing key retired by a
// newer one still verifies for this long, then may be removed.
const MaxTokenTTL = 24 * time.Hour

// SigningGrace is how long a new signing key is published before it
// signs: every instance of a fleet reads the store's signing keys at
// least every second, so none meets a token of a key it does not know.
const SigningGrace = 2 * time.Second

// Retired returns when key i of keys (oldest first, as SigningKeys returns
// them) stopped signing: SigningGrace after the Created of the next newer
// key; zero for the newest.
func Retired(keys []store.SigningKey, i int) time.Time {
	if i+1 >= len(keys) {
		return time.Time{}
	}
	return keys[i+1].Created.Add(SigningGrace)
}

// Signer returns the key of keys (oldest first) that signs at now: the
// newest created SigningGrace ago or earlier; while none is that old,
// the oldest, so that instances that made a store's first keys at once
// sign with the same one.
func Signer(keys []store.SigningKey, now time.Time) *store.SigningKey {
	for i := len(keys) - 1; i >= 0; i-- {
		if !now.Before(keys[i].Created.Add(SigningGrace)) {
			return &keys[i]
		}
	}
	if len(keys) == 0 {
		return nil
	}
	return &keys[0]
}

// ExpiredSigningKey reports whether key i of keys was retired more than
// MaxTokenTTL before now: no token it signed is valid any more, and it
// may be removed.
func ExpiredSigningKey(keys []store.SigningKey, i int, now time.Time) bool {
	retired := Retired(keys, i)
	return !retired.IsZero() && now.Sub(retired) > MaxTokenTTL
}

// RotateSigningKeys adds a new signing key to st, created at now, and
// removes the keys retired more than MaxTokenTTL before now: no token
// they signed can still be valid. It returns the new key and how many
// it removed.
func RotateSigningKeys(ctx context.Context, st store.Backend, now time.Time) (store.SigningKey, int, error) {
	k, err := store.NewSigningKey(now)
	if err != nil {
		return store.SigningKey{}, 0, err
	}
	if err := st.AddSigningKey(ctx, k); err != nil {
		return store.SigningKey{}, 0, err
	}
	keys, err := st.SigningKeys(ctx)
	if err != nil {
		return k, 0, err
	}
	removed := 0
	for i, old := range keys {
		if ExpiredSigningKey(keys, i, now) {
			if err := st.RemoveSigningKey(ctx, old.ID); err != nil {
				return k, removed, err
			}
			removed++
		}
	}
	return k, removed, nil
}
