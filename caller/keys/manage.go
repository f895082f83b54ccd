package keys

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// The key operations of the admin API and the dashboard: each changes
// the store, then has the Service sync before it returns, so that the
// change applies to the next request. Errors wrap ErrNotFound,
// ErrRevoked or ErrInvalid where those apply.

// CreateKey adds a key with the attributes a and returns it with its
// secret set: show it once, keep it nowhere.
func (s *Service) CreateKey(ctx context.Context, a Attrs, now time.Time) (KeyInfo, error) {
	rec, secret, err := Create(ctx, s.Store(), a, now)
	if err != nil {
		return KeyInfo{}, err
	}
	s.changed(ctx)
	out := NewKeyInfo(rec, now)
	out.Secret = secret
	return out, nil
}

// RotateKey gives the key id a new secret and returns the key with it.
func (s *Service) RotateKey(ctx context.Context, id string, now time.Time) (KeyInfo, error) {
	st := s.Store()
	secret, err := Rotate(ctx, st, id)
	if err != nil {
		return KeyInfo{}, err
	}
	s.changed(ctx)
	rec, err := st.Get(ctx, id)
	if err != nil {
		return KeyInfo{}, err
	}
	out := NewKeyInfo(rec, now)
	out.Secret = secret
	return out, nil
}

// RevokeKey revokes the key id at now and returns it.
func (s *Service) RevokeKey(ctx context.Context, id string, now time.Time) (KeyInfo, error) {
	st := s.Store()
	if err := st.Revoke(ctx, id, now); err != nil {
		return KeyInfo{}, err
	}
	s.changed(ctx)
	rec, err := st.Get(ctx, id)
	if err != nil {
		return KeyInfo{}, err
	}
	return NewKeyInfo(rec, now), nil
}

// PatchKey changes the settings of the key id by a JSON object of
// settings: a field set replaces the key's, a field set to null clears
// it (the tier's again), an absent field stays. It returns the key.
func (s *Service) PatchKey(ctx context.Context, id string, patch map[string]json.RawMessage, now time.Time) (KeyInfo, error) {
	st := s.Store()
	rec, err := st.Get(ctx, id)
	if err != nil {
		return KeyInfo{}, err
	}
	if err := policy.PatchSettings(&rec.Settings, patch); err != nil {
		return KeyInfo{}, err
	}
	if err := SetSettings(ctx, st, id, rec.Settings); err != nil {
		return KeyInfo{}, err
	}
	s.changed(ctx)
	return NewKeyInfo(rec, now), nil
}

// KeyInfo is a key in the admin API's and the dashboard's answers:
// never its hash. Secret is set only when one was just made.
type KeyInfo struct {
	ID       string           `json:"id"`
	Name     string           `json:"name"`
	Tier     string           `json:"tier"`
	State    string           `json:"state"`
	Created  time.Time        `json:"created"`
	Expires  *time.Time       `json:"expires"`
	Revoked  *time.Time       `json:"revoked"`
	LastUsed *time.Time       `json:"last_used"`
	Mint     []string         `json:"mint,omitempty"`
	Settings *policy.Settings `json:"settings,omitempty"`
	Secret   string           `json:"secret,omitempty"`
}

// NewKeyInfo returns the answer's view of r at now.
func NewKeyInfo(r store.Record, now time.Time) KeyInfo {
	opt := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		return &t
	}
	k := KeyInfo{
		ID: r.ID, Name: r.Name, Tier: r.Tier, State: r.State(now), Created: r.Created,
		Expires: opt(r.Expires), Revoked: opt(r.Revoked), LastUsed: opt(r.LastUsed), Mint: r.Mint,
	}
	if !r.Settings.IsZero() {
		k.Settings = &r.Settings
	}
	return k
}

// ErrorStatus is the HTTP status of an error of a key operation: 404,
// 409 (revoked), 400 (invalid attributes) or 500.
func ErrorStatus(err error) int {
	switch {
	case errors.Is(err, store.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, store.ErrRevoked):
		return http.StatusConflict
	case errors.Is(err, store.ErrInvalid):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}
