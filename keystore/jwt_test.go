package keystore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
)

const (
	testAudience = "my-app"
	testKID      = "k1"
)

// provider is a stand-in OpenID provider: discovery and a JWKS of the
// public halves of its keys, which a test may change or take down.
type provider struct {
	srv     *httptest.Server
	fetches atomic.Int64 // JWKS requests
	mu      sync.Mutex   // protects following fields
	keys    []jose.JSONWebKey
	down    bool
	maxAge  string
}

func newProvider(t testing.TB) *provider {
	t.Helper()
	p := new(provider)
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.down {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			json.NewEncoder(w).Encode(map[string]string{"issuer": p.srv.URL, "jwks_uri": p.srv.URL + "/keys"})
		case "/keys":
			p.fetches.Add(1)
			if p.maxAge != "" {
				w.Header().Set("Cache-Control", "max-age="+p.maxAge)
			}
			json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: p.keys})
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(p.srv.Close)
	return p
}

// publish makes the provider's JWKS the public halves of keys by kid.
func (p *provider) publish(keys map[string]crypto.Signer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.keys = p.keys[:0]
	for kid, k := range keys {
		p.keys = append(p.keys, jose.JSONWebKey{Key: k.Public(), KeyID: kid, Use: "sig"})
	}
}

func (p *provider) setDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
}

// verifierOf returns a verifier of p's tokens for testAudience, with its
// keys fetched, and the keys.
func verifierOf(t testing.TB, p *provider) (*TokenVerifier, *RemoteKeys) {
	t.Helper()
	keys := NewRemoteKeys(p.srv.URL, "", zap.NewNop())
	t.Cleanup(keys.Stop)
	keys.Refresh(t.Context())
	v, err := NewTokenVerifier([]*TokenIssuer{{
		Issuer: p.srv.URL, Audience: []string{testAudience, "other-app"}, Leeway: 30 * time.Second, Keys: keys,
		Caller: func(c map[string]any) (Client, bool) {
			sub, ok := c["sub"].(string)
			return Client{ID: "jwt:test:" + sub, Name: sub, Tier: "free"}, ok
		},
	}}, 100)
	if err != nil {
		t.Fatal(err)
	}
	return v, keys
}

// claims are valid claims of p's for user at now.
func claims(p *provider, user string, now time.Time) jwt.MapClaims {
	return jwt.MapClaims{
		"iss": p.srv.URL, "aud": testAudience, "sub": user,
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix(),
	}
}

// sign returns a compact JWS of c with key by method, naming kid.
func sign(t testing.TB, method jwt.SigningMethod, kid string, c jwt.MapClaims, key any) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, c)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func rsaKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func ecKey(t testing.TB, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestTokenVerifierAcceptsEachAlgorithm(t *testing.T) {
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	rsaK, p256, p384 := rsaKey(t), ecKey(t, elliptic.P256()), ecKey(t, elliptic.P384())
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{"rsa": rsaK, "p256": p256, "p384": p384, "ed": edKey})
	v, _ := verifierOf(t, p)
	now := time.Now()
	for _, tc := range []struct {
		method jwt.SigningMethod
		kid    string
		key    crypto.Signer
	}{
		{jwt.SigningMethodRS256, "rsa", rsaK}, {jwt.SigningMethodRS384, "rsa", rsaK}, {jwt.SigningMethodRS512, "rsa", rsaK},
		{jwt.SigningMethodPS256, "rsa", rsaK}, {jwt.SigningMethodPS384, "rsa", rsaK}, {jwt.SigningMethodPS512, "rsa", rsaK},
		{jwt.SigningMethodES256, "p256", p256}, {jwt.SigningMethodES384, "p384", p384}, {jwt.SigningMethodEdDSA, "ed", edKey},
	} {
		user := "u-" + tc.method.Alg()
		c, ok := v.Verify(t.Context(), sign(t, tc.method, tc.kid, claims(p, user, now), tc.key), now)
		if !ok || c.ID != "jwt:test:"+user || c.Tier != "free" {
			t.Errorf("%s: got %+v, %v; want the caller jwt:test:%s", tc.method.Alg(), c, ok, user)
		}
	}
}

// TestTokenVerifierRefuses checks every way a token must fail: not
// signed by a published key, signed for another issuer or app, out of
// its validity, or shaped to confuse the algorithm.
func TestTokenVerifierRefuses(t *testing.T) {
	key, p256, stranger := rsaKey(t), ecKey(t, elliptic.P256()), rsaKey(t)
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{testKID: key, "p256": p256})
	now := time.Now()
	valid := func(change func(jwt.MapClaims)) string {
		c := claims(p, "alice", now)
		if change != nil {
			change(c)
		}
		return sign(t, jwt.SigningMethodRS256, testKID, c, key)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	goodToken := valid(nil)
	parts := strings.Split(goodToken, ".")
	b64 := base64.RawURLEncoding.EncodeToString

	for _, tc := range []struct {
		name  string
		token string
	}{
		{"expired beyond the leeway", valid(func(c jwt.MapClaims) { c["exp"] = now.Add(-31 * time.Second).Unix() })},
		{"not yet valid beyond the leeway", valid(func(c jwt.MapClaims) { c["nbf"] = now.Add(time.Minute).Unix() })},
		{"issued in the future", valid(func(c jwt.MapClaims) { c["iat"] = now.Add(time.Minute).Unix() })},
		{"without exp", valid(func(c jwt.MapClaims) { delete(c, "exp") })},
		{"exp not a number", valid(func(c jwt.MapClaims) { c["exp"] = "tomorrow" })},
		{"wrong aud", valid(func(c jwt.MapClaims) { c["aud"] = "someone-else" })},
		{"aud differing in case", valid(func(c jwt.MapClaims) { c["aud"] = "My-App" })},
		{"without aud", valid(func(c jwt.MapClaims) { delete(c, "aud") })},
		{"wrong iss", valid(func(c jwt.MapClaims) { c["iss"] = "https://evil.example" })},
		{"iss with a trailing slash", valid(func(c jwt.MapClaims) { c["iss"] = p.srv.URL + "/" })},
		{"without iss", valid(func(c jwt.MapClaims) { delete(c, "iss") })},
		{"caller refused by the issuer", valid(func(c jwt.MapClaims) { c["sub"] = 42 })},
		{"payload changed after signing", parts[0] + "." + b64([]byte(`{"iss":"`+p.srv.URL+`","aud":"my-app","sub":"admin","exp":9999999999}`)) + "." + parts[2]},
		{"signature removed", parts[0] + "." + parts[1] + "."},
		{"alg none", sign(t, jwt.SigningMethodNone, testKID, claims(p, "alice", now), jwt.UnsafeAllowNoneSignatureType)},
		{"HS256 with the public key's PEM", sign(t, jwt.SigningMethodHS256, testKID, claims(p, "alice", now), pubPEM)},
		{"HS256 with the public key's DER", sign(t, jwt.SigningMethodHS256, testKID, claims(p, "alice", now), pubDER)},
		{"a key never published, under a published kid", sign(t, jwt.SigningMethodRS256, testKID, claims(p, "alice", now), stranger)},
		{"a key never published, under its own kid", sign(t, jwt.SigningMethodRS256, "stranger", claims(p, "alice", now), stranger)},
		{"no kid while several keys are published", sign(t, jwt.SigningMethodRS256, "", claims(p, "alice", now), key)},
		{"an RSA key's kid with an EC alg", sign(t, jwt.SigningMethodES256, testKID, claims(p, "alice", now), p256)},
		{"a P-256 key with ES384", sign(t, jwt.SigningMethodES384, "p256", claims(p, "alice", now), ecKey(t, elliptic.P384()))},
		{"crit header", func() string {
			tok := jwt.NewWithClaims(jwt.SigningMethodRS256, claims(p, "alice", now))
			tok.Header["kid"], tok.Header["crit"] = testKID, []string{"exp"}
			s, _ := tok.SignedString(key)
			return s
		}()},
		{"kid not a string", func() string {
			tok := jwt.NewWithClaims(jwt.SigningMethodRS256, claims(p, "alice", now))
			tok.Header["kid"] = 1
			s, _ := tok.SignedString(key)
			return s
		}()},
		{"oversized", valid(func(c jwt.MapClaims) { c["pad"] = strings.Repeat("x", MaxTokenSize) })},
		{"padded base64", parts[0] + "=." + parts[1] + "." + parts[2]},
		{"two tokens", goodToken + "." + goodToken},
		{"empty", ""},
		{"not a JWT", "eyJhbGciOiJSUzI1NiJ9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := verifierOf(t, p)
			if c, ok := v.Verify(t.Context(), tc.token, now); ok {
				t.Errorf("accepted as %+v", c)
			}
		})
	}

	v, _ := verifierOf(t, p)
	if _, ok := v.Verify(t.Context(), valid(func(c jwt.MapClaims) { c["exp"] = now.Add(-20 * time.Second).Unix() }), now); !ok {
		t.Error("a token expired within the leeway is refused")
	}
	if _, ok := v.Verify(t.Context(), valid(func(c jwt.MapClaims) { c["aud"] = []string{"x", "other-app"} }), now); !ok {
		t.Error("a token whose aud list holds a configured audience is refused")
	}
}

func TestJWKSAlgorithmIsHeld(t *testing.T) {
	key := rsaKey(t)
	p := newProvider(t)
	p.keys = []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: testKID, Algorithm: "RS256", Use: "sig"}}
	v, _ := verifierOf(t, p)
	now := time.Now()
	if _, ok := v.Verify(t.Context(), sign(t, jwt.SigningMethodPS256, testKID, claims(p, "a", now), key), now); ok {
		t.Error("a PS256 token verified with a key published for RS256 only")
	}
	if _, ok := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, testKID, claims(p, "a", now), key), now); !ok {
		t.Error("an RS256 token of the key published for RS256 is refused")
	}
}

func TestJWKSKeepsOnlyVerificationKeys(t *testing.T) {
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{
		{Key: []byte("a shared secret"), KeyID: "oct"},
		{Key: &small.PublicKey, KeyID: "small"},
		{Key: &rsaKey(t).PublicKey, KeyID: "enc", Use: "enc"},
		{Key: &rsaKey(t).PublicKey, KeyID: "hs", Algorithm: "HS256"},
		{Key: ecKey(t, elliptic.P521()).Public(), KeyID: "p521"},
		{Key: &rsaKey(t).PublicKey, KeyID: "good"},
	}})
	set, skipped, err := parseKeySet(body, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(set.byKID) != 1 || set.byKID["good"] == nil || skipped != 5 || set.only != set.byKID["good"] {
		t.Errorf("kept %d keys (good: %v), skipped %d; want only the good one, 5 skipped", len(set.byKID), set.byKID["good"] != nil, skipped)
	}
}

// TestKeyRotation checks that a token of a new kid is accepted after one
// refetch, that made-up kids do not refetch within 10 seconds, and that
// a remembered token ends when its key is withdrawn.
func TestKeyRotation(t *testing.T) {
	old, next := rsaKey(t), rsaKey(t)
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{"old": old})
	v, keys := verifierOf(t, p)
	now := time.Now()
	oldToken := sign(t, jwt.SigningMethodRS256, "old", claims(p, "a", now), old)
	if _, ok := v.Verify(t.Context(), oldToken, now); !ok {
		t.Fatal("a token of the published key is refused")
	}

	p.publish(map[string]crypto.Signer{"next": next})
	before := p.fetches.Load()
	keys.mu.Lock()
	keys.lastAttempt = time.Time{} // as if the last fetch were more than 10 s ago
	keys.mu.Unlock()
	if _, ok := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, "next", claims(p, "b", now), next), now); !ok {
		t.Fatal("a token of the rotated key is refused")
	}
	if got := p.fetches.Load() - before; got != 1 {
		t.Errorf("the new kid cost %d fetches, want 1", got)
	}
	for i := range 20 {
		v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, "made-up-"+string(rune('a'+i)), claims(p, "c", now), next), now)
	}
	if got := p.fetches.Load() - before; got != 1 {
		t.Errorf("made-up kids within 10 s cost %d more fetches, want none", got-1)
	}
	if _, ok := v.Verify(t.Context(), oldToken, now); ok {
		t.Error("a remembered token is still accepted after its key was withdrawn")
	}
}

// TestProviderDownKeepsKeys checks that the keys fetched before keep
// verifying while the provider fails.
func TestProviderDownKeepsKeys(t *testing.T) {
	key := rsaKey(t)
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{testKID: key})
	v, keys := verifierOf(t, p)
	p.setDown(true)
	keys.mu.Lock()
	keys.lastAttempt = time.Time{}
	keys.mu.Unlock()
	keys.Refresh(t.Context()) // fails
	now := time.Now()
	if _, ok := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, testKID, claims(p, "a", now), key), now); !ok {
		t.Error("a token is refused while the provider is down, with its key fetched before")
	}
}

// TestStartRetriesUntilTheProviderAnswers checks that keys a provider
// could not give at start arrive in the background once it answers.
func TestStartRetriesUntilTheProviderAnswers(t *testing.T) {
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{testKID: rsaKey(t)})
	p.setDown(true)
	keys := NewRemoteKeys(p.srv.URL, "", zap.NewNop())
	var failures atomic.Int64
	keys.OnFetchError = func(error) { failures.Add(1) }
	defer keys.Stop()
	keys.Start()
	time.Sleep(100 * time.Millisecond)
	if keys.Key(testKID) != nil {
		t.Fatal("keys while the provider is down")
	}
	if failures.Load() == 0 {
		t.Error("a failed fetch was not reported")
	}
	p.setDown(false)
	deadline := time.Now().Add(10 * time.Second)
	for keys.Key(testKID) == nil {
		if time.Now().After(deadline) {
			t.Fatal("the keys did not arrive within 10 s of the provider answering")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestKeysAreFetchedAgainWhenTheirLifetimeEnds checks that a key the
// provider adds is picked up once the set's max-age ends, with no token
// asking for it.
func TestKeysAreFetchedAgainWhenTheirLifetimeEnds(t *testing.T) {
	p := newProvider(t)
	p.maxAge = "0"
	old := rsaKey(t)
	p.publish(map[string]crypto.Signer{"old": old})
	keys := NewRemoteKeys(p.srv.URL, "", zap.NewNop())
	keys.minTTL = 50 * time.Millisecond
	defer keys.Stop()
	keys.Start()
	waitFor := func(kid string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); keys.Key(kid) == nil; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("key %s is not fetched within 10 s, with a lifetime of 50 ms", kid)
			}
		}
	}
	waitFor("old")
	p.publish(map[string]crypto.Signer{"old": old, "new": rsaKey(t)})
	waitFor("new")
}

func TestDiscoveryMustNameTheIssuer(t *testing.T) {
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{testKID: rsaKey(t)})
	keys := NewRemoteKeys(p.srv.URL+"/", "", zap.NewNop()) // the document names the issuer without the slash
	defer keys.Stop()
	if _, err := keys.fetch(); err == nil || !strings.Contains(err.Error(), "names the issuer") {
		t.Errorf("fetch of another issuer's document: %v, want it refused", err)
	}
}

// TestFetchIsBounded checks that a provider's answer is refused when it
// is too large, or redirects off https.
func TestFetchIsBounded(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/large":
			w.Write([]byte(`{"keys":["` + strings.Repeat("x", maxFetchedBytes) + `"]}`))
		case "/redirect":
			http.Redirect(w, r, "http://keys.example.com/jwks", http.StatusFound)
		}
	}))
	defer srv.Close()
	for path, want := range map[string]string{"/large": "larger than", "/redirect": "not https"} {
		keys := NewRemoteKeys(srv.URL, srv.URL+path, zap.NewNop())
		if _, err := keys.fetch(); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("fetching %s: %v, want an error saying %q", path, err, want)
		}
		keys.Stop()
	}
}

func TestKeysTTL(t *testing.T) {
	for _, tc := range []struct {
		header string
		want   time.Duration
	}{
		{"", defaultKeysTTL},
		{"public, max-age=3600", time.Hour},
		{"max-age=5", minKeysTTL},
		{"max-age=99999999999", maxKeysTTL},
		{"max-age=-1", defaultKeysTTL},
		{"no-store", minKeysTTL},
		{"Max-Age=\"600\"", 10 * time.Minute},
	} {
		if got := keysTTL(tc.header, minKeysTTL); got != tc.want {
			t.Errorf("keysTTL(%q) = %s, want %s", tc.header, got, tc.want)
		}
	}
}

func TestCheckProviderURL(t *testing.T) {
	for raw, ok := range map[string]bool{
		"https://auth.example.com/": true, "http://127.0.0.1:8080": true, "http://localhost/": true, "http://[::1]:9/": true,
		"http://auth.example.com/": false, "ftp://auth.example.com": false, "https://user@auth.example.com": false, "/relative": false,
	} {
		if err := CheckProviderURL(raw); (err == nil) != ok {
			t.Errorf("CheckProviderURL(%q) = %v, want ok %v", raw, err, ok)
		}
	}
}

// acceptedToken returns a verifier that has accepted the token at now.
func acceptedToken(tb testing.TB) (*TokenVerifier, string, time.Time) {
	tb.Helper()
	key := rsaKey(tb)
	p := newProvider(tb)
	p.publish(map[string]crypto.Signer{testKID: key})
	v, _ := verifierOf(tb, p)
	now := time.Now()
	token := sign(tb, jwt.SigningMethodRS256, testKID, claims(p, "alice", now), key)
	if _, ok := v.Verify(context.Background(), token, now); !ok {
		tb.Fatal("a valid token is refused")
	}
	return v, token, now
}

// BenchmarkVerifyToken measures a token remembered from before, the path
// of every request after a user's first, and one checked in full (RS256,
// 2048 bits).
func BenchmarkVerifyToken(b *testing.B) {
	v, token, now := acceptedToken(b)
	ctx := context.Background()
	b.Run("remembered", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			v.Verify(ctx, token, now)
		}
	})
	b.Run("signature", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := v.verify(ctx, token, now); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func TestRememberedTokenDoesNotAllocate(t *testing.T) {
	v, token, now := acceptedToken(t)
	ctx := context.Background()
	if n := testing.AllocsPerRun(100, func() { v.Verify(ctx, token, now) }); n != 0 {
		t.Errorf("a remembered token costs %v allocations, want 0", n)
	}
}
