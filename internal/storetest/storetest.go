// Package storetest holds the helpers the store backends' tests share:
// keys made as the product makes them, and records compared as stored.
package storetest

import (
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// Create adds a key and returns its record and secret.
func Create(t *testing.T, st store.Backend, name, tier string, expires, now time.Time) (store.Record, string) {
	t.Helper()
	return CreateWith(t, st, keys.Attrs{Name: name, Tier: tier, Expires: expires}, now)
}

// CreateWith adds a key made with a and returns its record and secret.
func CreateWith(t *testing.T, st store.Backend, a keys.Attrs, now time.Time) (store.Record, string) {
	t.Helper()
	r, secret, err := keys.Create(t.Context(), st, a, now)
	if err != nil {
		t.Fatalf("Create(%+v): %v", a, err)
	}
	return r, secret
}

// WantRecord fails the test unless got is want, field by field.
func WantRecord(t *testing.T, got, want store.Record) {
	t.Helper()
	if got.ID != want.ID || got.Name != want.Name || got.Tier != want.Tier || got.Hash != want.Hash ||
		!got.Created.Equal(want.Created) || !got.Expires.Equal(want.Expires) ||
		!got.Revoked.Equal(want.Revoked) || !got.LastUsed.Equal(want.LastUsed) ||
		!slices.Equal(got.Mint, want.Mint) || (got.Mint == nil) != (want.Mint == nil) ||
		!reflect.DeepEqual(got.Settings, want.Settings) {
		t.Errorf("record = %+v\nwant     %+v", got, want)
	}
}

// FullSettings sets every field.
func FullSettings() policy.Settings {
	conc, maxTok := 5, int64(2048)
	return policy.Settings{
		Requests:   &policy.Rate{N: 100, Window: time.Minute},
		Tokens:     &policy.Rate{N: 200_000, Window: time.Minute, Burst: 50_000},
		Concurrent: &conc,
		Quota:      &policy.Amount{N: 10_000_000, Period: "month"},
		Budget:     &policy.Amount{N: 50_000_000, Period: "month"},
		Models:     []string{"vigthoria-fast-*"},
		MaxTokens:  &maxTok,
		Origins:    []string{"https://app.acme.com", "http://localhost:3000"},
	}
}
