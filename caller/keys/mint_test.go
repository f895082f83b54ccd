package keys

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/token"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// mintVerifier verifies the tokens s mints, as the handler does: the
// caller is the token's user while its minting key may still mint.
func mintVerifier(t testing.TB, s *Service, maxTTL time.Duration) *token.Verifier {
	return mintVerifierOf(t, s, maxTTL, 16)
}

// mintVerifierOf is mintVerifier remembering at most remember tokens.
func mintVerifierOf(t testing.TB, s *Service, maxTTL time.Duration, remember int) *token.Verifier {
	t.Helper()
	iss := &token.Issuer{
		Issuer: MintIssuer, Audience: []string{MintAudience}, Leeway: time.Second,
		Keys: s.MintKeys(maxTTL),
		Caller: func(claims map[string]any) (caller.Client, bool) {
			user, tier, keyID, models, ok := ParseMintedClaims(claims)
			if !ok {
				return caller.Client{}, false
			}
			keyTier, mint, live := s.Minter(keyID, time.Now())
			if !live || !slices.Contains(mint, tier) {
				return caller.Client{}, false
			}
			return caller.Client{ID: "mint:" + keyID + ":" + user, Name: user, Tier: tier,
				Minted: &caller.Minted{KeyID: keyID, KeyTier: keyTier, Models: models}}, true
		},
		Still: func(c caller.Client, now time.Time) bool {
			_, mint, live := s.Minter(c.Minted.KeyID, now)
			return live && slices.Contains(mint, c.Tier)
		},
	}
	v, err := token.NewVerifier([]*token.Issuer{iss}, remember)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// addMinter adds a key of tier pro that may mint tokens of tier free,
// and waits until s knows it may.
func addMinter(t testing.TB, s *Service, cli store.Backend, now time.Time) store.Record {
	t.Helper()
	backend, _, err := Create(t.Context(), cli, Attrs{Name: "backend", Tier: "pro", Mint: []string{"free"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "the minting key is known", func() bool { _, _, ok := s.Minter(backend.ID, time.Now()); return ok })
	return backend
}

func TestMintedTokenVerifiesUntilItsKeyStopsMinting(t *testing.T) {
	s, cli := startService(t, nil)
	now := time.Now()
	backend := addMinter(t, s, cli, now)
	if tier, mint, _ := s.Minter(backend.ID, now); tier != "pro" || !slices.Equal(mint, []string{"free"}) {
		t.Errorf("Minter = %s %v, want pro [free]", tier, mint)
	}

	token, expires, err := s.Mint(t.Context(), TokenRequest{User: "alice", Tier: "free", Models: []string{"fast-*"}, KeyID: backend.ID, TTL: time.Minute}, now)
	if err != nil {
		t.Fatal(err)
	}
	if want := now.Add(time.Minute).Truncate(time.Second); !expires.Equal(want) {
		t.Errorf("expires %v, want %v", expires, want)
	}
	v := mintVerifier(t, s, time.Hour)
	c, err := v.Verify(t.Context(), token, now)
	if err != nil || c.ID != "mint:"+backend.ID+":alice" || c.Tier != "free" || c.Minted.KeyTier != "pro" || !slices.Equal(c.Minted.Models, []string{"fast-*"}) {
		t.Fatalf("Verify = %+v %v, want alice of tier free, minted by a pro key, fast-* only", c, err)
	}
	// Remembered, a token costs a hash, a lookup and the minting key's
	// rights: no allocation.
	if n := testing.AllocsPerRun(100, func() { v.Verify(context.Background(), token, now) }); n != 0 {
		t.Errorf("a remembered minted token costs %v allocations, want 0", n)
	}
	if _, err := v.Verify(t.Context(), token, expires.Add(2*time.Second)); err == nil {
		t.Error("a minted token verifies after its exp")
	}

	// Revocation ends the remembered token too, without a new signature
	// check in between.
	if err := cli.Revoke(t.Context(), backend.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "the revoked key's token is refused", func() bool { _, err := v.Verify(t.Context(), token, time.Now()); return err != nil })
	if _, _, ok := s.Minter(backend.ID, time.Now()); ok {
		t.Error("a revoked key may still mint")
	}
}

func TestMinterFollowsTheKeysLife(t *testing.T) {
	s, cli := startService(t, nil)
	now := time.Now()
	plain, _, err := Create(t.Context(), cli, Attrs{Name: "plain", Tier: "pro"}, now)
	if err != nil {
		t.Fatal(err)
	}
	expiring, _, err := Create(t.Context(), cli, Attrs{Name: "expiring", Tier: "pro", Mint: []string{"free"}, Expires: now.Add(time.Hour)}, now)
	if err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "both keys are known", func() bool { return s.index.size() == 2 })
	if _, _, ok := s.Minter(plain.ID, now); ok {
		t.Error("a key without mint rights may mint")
	}
	if _, _, ok := s.Minter(expiring.ID, now); !ok {
		t.Error("a key with mint rights may not mint")
	}
	if _, _, ok := s.Minter(expiring.ID, now.Add(time.Hour)); ok {
		t.Error("an expired key may mint")
	}
	_, exp, err := s.Mint(t.Context(), TokenRequest{User: "u", Tier: "free", KeyID: expiring.ID, TTL: 2 * time.Hour}, now)
	if want := expiring.Expires.Truncate(time.Second); err != nil || !exp.Equal(want) {
		t.Errorf("a token of a key that expires in an hour, asked for 2h, expires at %v (%v), want with the key at %v", exp, err, want)
	}
	// A rotation keeps the right; a sync from scratch (the store was
	// emptied) forgets it with the key.
	if _, err := Rotate(t.Context(), cli, expiring.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if _, _, ok := s.Minter(expiring.ID, now); !ok {
		t.Error("a rotated key lost its mint rights")
	}
	s.index.clear()
	if _, _, ok := s.Minter(expiring.ID, now); ok {
		t.Error("a cleared index still knows a minter")
	}
}

func TestSigningKeysRotateAndRetire(t *testing.T) {
	s, cli := startService(t, nil)
	now := time.Now()
	backend := addMinter(t, s, cli, now)
	req := TokenRequest{User: "alice", Tier: "free", KeyID: backend.ID, TTL: time.Minute}
	old, _, err := s.Mint(t.Context(), req, now)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := cli.SigningKeys(t.Context())
	if err != nil || len(keys) != 1 {
		t.Fatalf("after the first mint the store holds %d signing keys (%v), want 1", len(keys), err)
	}

	// A newer key, added elsewhere, signs within a poll; the old one
	// verifies for maxTTL after its retirement, then no longer.
	next, err := store.NewSigningKey(now.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.AddSigningKey(t.Context(), next); err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "the new key is read", func() bool {
		set := s.signing.set.Load()
		return set != nil && len(set.keys) == 2
	})
	const maxTTL = 2 * time.Second
	if _, err := mintVerifier(t, s, maxTTL).Verify(t.Context(), old, time.Now()); err != nil {
		t.Error("a token of the retired key is refused within max_token_ttl of its retirement")
	}
	time.Sleep(time.Until(Retired([]store.SigningKey{keys[0], next}, 0).Add(maxTTL + 50*time.Millisecond)))
	if _, err := mintVerifier(t, s, maxTTL).Verify(t.Context(), old, time.Now()); err == nil {
		t.Error("a retired key verifies past max_token_ttl after its retirement")
	}

	var jwks struct {
		Keys []struct{ Kid, Kty, Crv, X, Alg string }
	}
	body, err := s.JWKS(t.Context())
	if err != nil || json.Unmarshal(body, &jwks) != nil {
		t.Fatalf("JWKS: %s %v", body, err)
	}
	if len(jwks.Keys) != 2 || jwks.Keys[1].Kid != next.ID || jwks.Keys[1].Kty != "OKP" || jwks.Keys[1].Crv != "Ed25519" || jwks.Keys[1].Alg != "EdDSA" || jwks.Keys[1].X == "" {
		t.Errorf("JWKS = %s, want the two keys, newest last", body)
	}
	if strings.Contains(string(body), `"d"`) {
		t.Errorf("the JWKS %s holds a private key", body)
	}
}

func TestMintWithoutSigningStore(t *testing.T) {
	s := &Service{}
	if _, _, err := s.Mint(context.Background(), TokenRequest{}, time.Now()); err == nil {
		t.Error("minting without a store succeeded")
	}
}

// BenchmarkVerifyMintedToken measures a minted token remembered from
// before, the path of every request after a user's first, and one
// checked in full (EdDSA), with its minting key's rights.
func BenchmarkVerifyMintedToken(b *testing.B) {
	s, cli := startService(b, nil)
	now := time.Now()
	backend := addMinter(b, s, cli, now)
	token, _, err := s.Mint(b.Context(), TokenRequest{User: "alice", Tier: "free", KeyID: backend.ID, TTL: time.Hour}, now)
	if err != nil {
		b.Fatal(err)
	}
	v := mintVerifier(b, s, time.Hour)
	ctx := context.Background()
	if _, err := v.Verify(ctx, token, now); err != nil {
		b.Fatal("the minted token is refused")
	}
	b.Run("remembered", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			v.Verify(ctx, token, now)
		}
	})
	// Two tokens and a verifier that remembers one: each is checked in
	// full, the other having taken its place.
	other, _, err := s.Mint(b.Context(), TokenRequest{User: "bob", Tier: "free", KeyID: backend.ID, TTL: time.Hour}, now)
	if err != nil {
		b.Fatal(err)
	}
	full := mintVerifierOf(b, s, time.Hour, 1)
	b.Run("signature", func(b *testing.B) {
		b.ReportAllocs()
		tokens := [2]string{token, other}
		i := 0
		for b.Loop() {
			if _, err := full.Verify(ctx, tokens[i&1], now); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}
