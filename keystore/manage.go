package keystore

import (
	"context"
	"encoding/json"
	"time"
)

// The key operations of the admin API and the dashboard: each changes
// the store, then has the Service sync at once, so that the change
// applies to requests within a second. Errors wrap ErrNotFound,
// ErrRevoked or ErrInvalid where those apply.

// CreateKey adds a key with the attributes a and returns it with its
// secret set: show it once, keep it nowhere.
func (s *Service) CreateKey(ctx context.Context, a Attrs, now time.Time) (KeyInfo, error) {
	rec, secret, err := Create(ctx, s.Store(), a, now)
	if err != nil {
		return KeyInfo{}, err
	}
	s.changed()
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
	s.changed()
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
	s.changed()
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
	if err := patchSettings(&rec.Settings, patch); err != nil {
		return KeyInfo{}, err
	}
	if err := SetSettings(ctx, st, id, rec.Settings); err != nil {
		return KeyInfo{}, err
	}
	s.changed()
	return NewKeyInfo(rec, now), nil
}
