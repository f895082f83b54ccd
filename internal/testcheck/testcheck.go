// Package testcheck holds the checks that tests of several packages
// share: waiting for a condition. It imports nothing of the project, so
// that every package's tests can use it; the checks of a store are in
// storecheck.
package testcheck

import (
	"testing"
	"time"
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
