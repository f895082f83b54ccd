package keys

import (
	"context"
	"fmt"
	"slices"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// maxAttrLen bounds key names and tiers, in characters.
const maxAttrLen = 64

// maxMint bounds the tiers a key may mint tokens of: a key is one app's
// backend, which has a few kinds of users, not a catalogue.
const maxMint = 16

// Attrs are what a new key is made with.
type Attrs struct {
	Name    string
	Tier    string
	Expires time.Time // zero: never
	Mint    []string  // tiers it may mint tokens of; each a valid tier name (validTier)
	// Settings are the key's own limits over its tier's; the zero
	// Settings follow the tier.
	Settings policy.Settings
}

// Create adds a key with the attributes a to st and returns its record
// and its secret. The secret exists only in this return value: show it
// to the user once. A zero a.Expires means the key never expires;
// otherwise it must be after now. a.Mint is stored sorted and without
// repeats. Bad attributes are reported as errors wrapping ErrInvalid.
func Create(ctx context.Context, st store.Backend, a Attrs, now time.Time) (store.Record, string, error) {
	if err := validName(a.Name); err != nil {
		return store.Record{}, "", err
	}
	if err := validTier(a.Tier); err != nil {
		return store.Record{}, "", err
	}
	mint, err := normMint(a.Mint)
	if err != nil {
		return store.Record{}, "", err
	}
	if err := a.Settings.Check(); err != nil {
		return store.Record{}, "", err
	}
	now = store.StoredTime(now)
	expires := store.StoredTime(a.Expires)
	if !expires.IsZero() && !expires.After(now) {
		return store.Record{}, "", fmt.Errorf("%w: expiry %s is not in the future", store.ErrInvalid, expires.Format(time.RFC3339))
	}
	id, err := NewID()
	if err != nil {
		return store.Record{}, "", fmt.Errorf("creating a key ID: %w", err)
	}
	secret, err := clientkey.New()
	if err != nil {
		return store.Record{}, "", fmt.Errorf("creating a key: %w", err)
	}
	r := store.Record{ID: id, Name: a.Name, Tier: a.Tier, Hash: store.HashSecret(secret), Created: now, Expires: expires, Mint: mint, Settings: a.Settings}
	if err := st.Insert(ctx, r); err != nil {
		return store.Record{}, "", fmt.Errorf("storing key %s: %w", id, err)
	}
	return r, secret, nil
}

// Rotate gives the key id a new secret and returns it; the old secret
// stops working. The ID, name, tier, expiry and mint tiers stay. It
// returns an error wrapping ErrNotFound or ErrRevoked when the key
// cannot be rotated.
func Rotate(ctx context.Context, st store.Backend, id string) (string, error) {
	secret, err := clientkey.New()
	if err != nil {
		return "", fmt.Errorf("creating a key: %w", err)
	}
	if err := st.SetHash(ctx, id, store.HashSecret(secret)); err != nil {
		return "", fmt.Errorf("rotating key %s: %w", id, err)
	}
	return secret, nil
}

// SetSettings replaces the settings of the key id with s, after
// checking them: the zero Settings make the key follow its tier in
// everything. It returns an error wrapping ErrInvalid, ErrNotFound or
// ErrRevoked when the key cannot be changed so.
func SetSettings(ctx context.Context, st store.Backend, id string, s policy.Settings) error {
	if err := s.Check(); err != nil {
		return err
	}
	if err := st.SetSettings(ctx, id, s); err != nil {
		return fmt.Errorf("changing the settings of key %s: %w", id, err)
	}
	return nil
}

// validName checks a key's name: 1 to 64 printable characters. The error
// wraps ErrInvalid.
func validName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: a key needs a name", store.ErrInvalid)
	}
	if !utf8.ValidString(name) || utf8.RuneCountInString(name) > maxAttrLen {
		return fmt.Errorf("%w: a key name is at most %d characters of UTF-8", store.ErrInvalid, maxAttrLen)
	}
	for _, r := range name {
		if !unicode.IsPrint(r) {
			return fmt.Errorf("%w: key name %q has a character that is not printable", store.ErrInvalid, name)
		}
	}
	return nil
}

// validTier checks a tier name: 1 to 64 characters of a-z, 0-9, _ and -.
// The error wraps ErrInvalid.
func validTier(tier string) error {
	if tier == "" || len(tier) > maxAttrLen {
		return fmt.Errorf("%w: a tier is 1 to %d characters", store.ErrInvalid, maxAttrLen)
	}
	for i := range len(tier) {
		if c := tier[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' && c != '-' {
			return fmt.Errorf("%w: invalid tier %q: use a-z, 0-9, _ and -", store.ErrInvalid, tier)
		}
	}
	return nil
}

// normMint checks the tiers a key may mint tokens of and returns them
// sorted, without repeats; nil for none. The error wraps ErrInvalid.
func normMint(tiers []string) ([]string, error) {
	if len(tiers) == 0 {
		return nil, nil
	}
	for _, t := range tiers {
		if err := validTier(t); err != nil {
			return nil, fmt.Errorf("mint tier: %w", err)
		}
	}
	mint := slices.Compact(slices.Sorted(slices.Values(tiers)))
	if len(mint) > maxMint {
		return nil, fmt.Errorf("%w: a key may mint tokens of at most %d tiers, not %d", store.ErrInvalid, maxMint, len(mint))
	}
	return mint, nil
}
