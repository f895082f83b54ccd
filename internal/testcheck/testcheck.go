// Package testcheck holds the checks that tests of several packages
// share: waiting for a condition, and looking for a private key in text.
package testcheck

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// Within fails the test unless cond holds within a second.
func Within(t testing.TB, what string, cond func() bool) {
	t.Helper()
	WaitFor(t, time.Second, what, cond)
}

// WaitFor polls cond until it holds, failing the test after within.
func WaitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

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

// signingIDs returns the IDs of st's signing keys, in their order.
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
