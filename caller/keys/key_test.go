package keys

import (
	"crypto/sha256"
	"regexp"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/store"
)

func TestHashSecret(t *testing.T) {
	s, err := clientkey.New()
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range []string{s, "", "short", s + "x"} {
		if got, want := store.HashSecret(in), store.Hash(sha256.Sum256([]byte(in))); got != want {
			t.Errorf("HashSecret(%q) = %x, want the SHA-256 %x", in, got, want)
		}
	}
}

func TestHashSecretNoAllocations(t *testing.T) {
	s, err := clientkey.New()
	if err != nil {
		t.Fatal(err)
	}
	var sink bool
	if n := testing.AllocsPerRun(100, func() { h := store.HashSecret(s); sink = h[0] == 0 }); n != 0 {
		t.Errorf("HashSecret: %v allocations, want 0", n)
	}
	_ = sink
}

func TestNewID(t *testing.T) {
	shape := regexp.MustCompile(`^key_[0-9A-Za-z]{16}$`)
	a, err := NewID()
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewID()
	if err != nil {
		t.Fatal(err)
	}
	if !shape.MatchString(a) || !shape.MatchString(b) || a == b {
		t.Errorf("NewID() = %q, %q, want two different key_ and 16 base62 characters", a, b)
	}
	if clientkey.Valid(a) {
		t.Errorf("an ID passes as a secret: %q", a)
	}
}
