// Package storecheck holds the checks of a store that tests of several
// packages share: looking for a private signing key in text, and listing
// the signing keys.
package storecheck

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// PrivateForms are the ways a private signing key could be spelled in
// text.
func PrivateForms(k store.SigningKey) []string {
	seed := k.Private.Seed()
	return []string{
		hex.EncodeToString(seed), base64.StdEncoding.EncodeToString(seed), base64.RawURLEncoding.EncodeToString(seed),
		base64.StdEncoding.EncodeToString(k.Private), fmt.Sprint([]byte(k.Private)[:8]), string(seed),
	}
}

// WantNoPrivate fails the test when text holds k's private key in any
// form of PrivateForms.
func WantNoPrivate(t testing.TB, what, text string, k store.SigningKey) {
	t.Helper()
	for _, form := range PrivateForms(k) {
		if strings.Contains(text, form) {
			t.Errorf("%s holds the private key of %s: %q", what, k.ID, text)
			return
		}
	}
}

// SigningIDs returns the IDs of st's signing keys, in their order.
func SigningIDs(t testing.TB, st store.Backend) []string {
	t.Helper()
	keys, err := st.SigningKeys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, 0, len(keys))
	for _, k := range keys {
		ids = append(ids, k.ID)
	}
	return ids
}
