package token

import (
	"context"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
	"github.com/vigthoria/caddy-vigthoria/caller"
)

// staticKeys is a key source that never changes.
type staticKeys map[string]*VerificationKey

func (s staticKeys) Key(kid string) *VerificationKey     { return s[kid] }
func (staticKeys) Refresh(context.Context, string) error { return nil }

// FuzzVerifyToken checks that the token parser never panics and never
// accepts a token whose signature a published key does not verify, as
// go-jose, a second JOSE library, checks it.
func FuzzVerifyToken(f *testing.F) {
	rsaK, p256 := rsaKey(f), ecKey(f, elliptic.P256())
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	keys := staticKeys{"rsa": {Key: &rsaK.PublicKey}, "p256": {Key: &p256.PublicKey}, "ed": {Key: edKey.Public()}}
	const issuer = "https://auth.example.com/"
	v, err := NewVerifier([]*Issuer{{
		Issuer: issuer, Audience: []string{testAudience}, Keys: keys,
		Caller: func(c map[string]any) (caller.Client, bool) {
			sub, ok := c["sub"].(string)
			return caller.Client{ID: sub}, ok
		},
	}}, 10)
	if err != nil {
		f.Fatal(err)
	}
	now := time.Unix(1_800_000_000, 0)
	c := jwt.MapClaims{"iss": issuer, "aud": testAudience, "sub": "alice", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
	for _, s := range []string{
		sign(f, jwt.SigningMethodRS256, "rsa", c, rsaK), sign(f, jwt.SigningMethodPS384, "rsa", c, rsaK),
		sign(f, jwt.SigningMethodES256, "p256", c, p256), sign(f, jwt.SigningMethodEdDSA, "ed", c, edKey),
		sign(f, jwt.SigningMethodNone, "rsa", c, jwt.UnsafeAllowNoneSignatureType),
		sign(f, jwt.SigningMethodHS256, "rsa", c, []byte("secret")),
		"", ".", "..", "eyJhbGciOiJub25lIn0.e30.",
	} {
		f.Add(s)
	}
	algs := []jose.SignatureAlgorithm{jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512, jose.ES256, jose.ES384, jose.EdDSA}
	f.Fuzz(func(t *testing.T, token string) {
		client, err := v.Verify(context.Background(), token, now)
		if err != nil {
			return
		}
		jws, err := jose.ParseSigned(token, algs)
		if err != nil {
			t.Fatalf("accepted as %q a token go-jose cannot parse: %v", client.ID, err)
		}
		kid := jws.Signatures[0].Header.KeyID
		if keys[kid] == nil {
			t.Fatalf("accepted a token of an unpublished kid %q", kid)
		}
		payload, err := jws.Verify(keys[kid].Key)
		if err != nil {
			t.Fatalf("accepted a token whose signature go-jose refuses: %v", err)
		}
		var got struct{ Sub string }
		if json.Unmarshal(payload, &got) != nil || got.Sub != client.ID {
			t.Fatalf("accepted as %q a token of subject %q", client.ID, got.Sub)
		}
	})
}
