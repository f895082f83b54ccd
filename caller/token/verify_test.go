package token

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
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
	"github.com/vigthoria/caddy-vigthoria/caller"
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
	fetches atomic.Int64  // JWKS requests
	held    atomic.Int64  // JWKS requests held by hold
	hold    chan struct{} // when set before the first request, JWKS requests wait until it is closed
	mu      sync.Mutex    // protects following fields
	keys    []jose.JSONWebKey
	down    bool
	maxAge  string
}

func newProvider(t testing.TB) *provider {
	t.Helper()
	p := new(provider)
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.hold != nil && r.URL.Path == "/keys" {
			p.held.Add(1)
			<-p.hold
		}
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
// keys, changed by opts, fetched, and the keys.
func verifierOf(t testing.TB, p *provider, opts ...func(*RemoteKeys)) (*Verifier, *RemoteKeys) {
	t.Helper()
	keys := NewRemoteKeys(p.srv.URL, "", zap.NewNop())
	t.Cleanup(keys.Stop)
	for _, opt := range opts {
		opt(keys)
	}
	if err := keys.Refresh(t.Context(), ""); err != nil {
		t.Fatal(err)
	}
	return verifierWith(t, p, keys), keys
}

// verifierWith returns a verifier of p's tokens for testAudience, with
// keys.
func verifierWith(t testing.TB, p *provider, keys *RemoteKeys) *Verifier {
	t.Helper()
	v, err := NewVerifier([]*Issuer{{
		Issuer: p.srv.URL, Audience: []string{testAudience, "other-app"}, Leeway: 30 * time.Second, Keys: keys,
		Caller: func(c map[string]any) (caller.Client, bool) {
			sub, ok := c["sub"].(string)
			return caller.Client{ID: "jwt:test:" + sub, Name: sub, Tier: "free"}, ok
		},
	}}, 100)
	if err != nil {
		t.Fatal(err)
	}
	return v
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
		c, err := v.Verify(t.Context(), sign(t, tc.method, tc.kid, claims(p, user, now), tc.key), now)
		if err != nil || c.ID != "jwt:test:"+user || c.Tier != "free" {
			t.Errorf("%s: got %+v, %v; want the caller jwt:test:%s", tc.method.Alg(), c, err, user)
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
			v, _ := verifierOf(t, p, func(k *RemoteKeys) { k.spacing = 0 })
			if c, err := v.Verify(t.Context(), tc.token, now); err == nil {
				t.Errorf("accepted as %+v", c)
			} else if errors.Is(err, ErrKeysUnavailable) {
				t.Errorf("refused as %v, not as the caller's failure", err)
			}
		})
	}

	v, _ := verifierOf(t, p)
	if _, err := v.Verify(t.Context(), valid(func(c jwt.MapClaims) { c["exp"] = now.Add(-20 * time.Second).Unix() }), now); err != nil {
		t.Error("a token expired within the leeway is refused")
	}
	if _, err := v.Verify(t.Context(), valid(func(c jwt.MapClaims) { c["aud"] = []string{"x", "other-app"} }), now); err != nil {
		t.Error("a token whose aud list holds a configured audience is refused")
	}
}

func TestJWKSAlgorithmIsHeld(t *testing.T) {
	key := rsaKey(t)
	p := newProvider(t)
	p.keys = []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: testKID, Algorithm: "RS256", Use: "sig"}}
	v, _ := verifierOf(t, p)
	now := time.Now()
	if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodPS256, testKID, claims(p, "a", now), key), now); err == nil {
		t.Error("a PS256 token verified with a key published for RS256 only")
	}
	if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, testKID, claims(p, "a", now), key), now); err != nil {
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

// fakeClock is the time of a RemoteKeys, moved by the test.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// lastBegan is when keys' last fetch began.
func lastBegan(keys *RemoteKeys) time.Time {
	keys.mu.Lock()
	defer keys.mu.Unlock()
	return keys.lastBegan
}

// TestKeyRotation rotates the provider's key, which signs at once, 0.5 s,
// 2 s and 5 s after the last fetch: each token of the new key is accepted
// after one fetch, which waited for the spacing of fetches if it had to.
// A remembered token ends when its key is withdrawn.
func TestKeyRotation(t *testing.T) {
	old := rsaKey(t)
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{"old": old})
	clock := &fakeClock{t: time.Now()}
	v, keys := verifierOf(t, p, func(k *RemoteKeys) { k.now = clock.Now })
	now := time.Now()
	oldToken := sign(t, jwt.SigningMethodRS256, "old", claims(p, "a", now), old)
	if _, err := v.Verify(t.Context(), oldToken, now); err != nil {
		t.Fatal("a token of the published key is refused")
	}

	for _, after := range []time.Duration{500 * time.Millisecond, 2 * time.Second, 5 * time.Second} {
		clock.set(lastBegan(keys).Add(after))
		next := rsaKey(t)
		kid := "after-" + after.String()
		p.publish(map[string]crypto.Signer{kid: next})
		before := p.fetches.Load()
		if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, kid, claims(p, "b", now), next), now); err != nil {
			t.Errorf("a token of a key rotated %s after the last fetch: %v, want it accepted", after, err)
		}
		if got := p.fetches.Load() - before; got != 1 {
			t.Errorf("the key rotated %s after the last fetch cost %d fetches, want 1", after, got)
		}
	}
	if _, err := v.Verify(t.Context(), oldToken, now); err == nil {
		t.Error("a remembered token is still accepted after its key was withdrawn")
	}
}

// TestKeyRotationWithoutKID: a provider that publishes one key and signs
// without kid replaces it under the same name; the first token of the new
// key is accepted after one fetch, and a token of a key never published
// is the caller's failure.
func TestKeyRotationWithoutKID(t *testing.T) {
	old, next := rsaKey(t), rsaKey(t)
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{"": old})
	v, _ := verifierOf(t, p, func(k *RemoteKeys) { k.spacing = 0 })
	now := time.Now()
	if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, "", claims(p, "a", now), old), now); err != nil {
		t.Fatalf("a token without kid of the one published key: %v", err)
	}
	p.publish(map[string]crypto.Signer{"": next})
	before := p.fetches.Load()
	if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, "", claims(p, "b", now), next), now); err != nil {
		t.Errorf("a token without kid of the key that replaced it: %v, want it accepted", err)
	}
	if got := p.fetches.Load() - before; got != 1 {
		t.Errorf("the rotation cost %d fetches, want 1", got)
	}
	_, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, "", claims(p, "c", now), rsaKey(t)), now)
	if err == nil || errors.Is(err, ErrKeysUnavailable) {
		t.Errorf("a token without kid of a key never published: %v, want the caller's failure", err)
	}
}

// TestMadeUpKIDsAreBounded sends 10,000 tokens of the issuer naming
// made-up kids at once, as a stranger could: they wait for the same few
// fetches, at most one a second, are refused as failures of the caller's,
// and leave nothing behind.
func TestMadeUpKIDsAreBounded(t *testing.T) {
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{testKID: rsaKey(t)})
	v, keys := verifierOf(t, p)
	now := time.Now()
	payload, _ := json.Marshal(claims(p, "mallory", now))
	body := base64.RawURLEncoding.EncodeToString(payload) + "." + base64.RawURLEncoding.EncodeToString(make([]byte, 256))
	const senders, each = 5000, 2 // the race detector allows 8128 goroutines
	before, began := p.fetches.Load(), time.Now()
	var wg sync.WaitGroup
	var unavailable, accepted atomic.Int64
	for range senders {
		wg.Go(func() {
			for range each {
				header := `{"alg":"RS256","typ":"JWT","kid":"` + rand.Text() + `"}`
				_, err := v.Verify(t.Context(), base64.RawURLEncoding.EncodeToString([]byte(header))+"."+body, now)
				switch {
				case err == nil:
					accepted.Add(1)
				case errors.Is(err, ErrKeysUnavailable):
					unavailable.Add(1)
				}
			}
		})
	}
	wg.Wait()
	took := time.Since(began)
	fetches := p.fetches.Load() - before
	t.Logf("%d tokens of made-up kids in %s: %d fetches", senders*each, took.Round(time.Millisecond), fetches)
	if most := int64(took/time.Second) + 2; fetches > most {
		t.Errorf("%d tokens of made-up kids in %s cost %d fetches, want at most %d (one a second)", senders*each, took, fetches, most)
	}
	if accepted.Load() != 0 || unavailable.Load() != 0 {
		t.Errorf("%d accepted, %d refused as unavailable keys; want every one refused as a failure", accepted.Load(), unavailable.Load())
	}
	if n := v.remembered.Len(); n != 0 {
		t.Errorf("%d tokens remembered, want none", n)
	}
	if kids := keys.keys.Load().kids(); len(kids) != 1 {
		t.Errorf("the key set holds %v, want the one published key", kids)
	}
}

// TestTokenWaitsForTheFirstFetch: a token that comes while the keys are
// being fetched for the first time, at start-up, is accepted by that
// fetch, without another.
func TestTokenWaitsForTheFirstFetch(t *testing.T) {
	key := rsaKey(t)
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{testKID: key})
	p.hold = make(chan struct{})
	keys := NewRemoteKeys(p.srv.URL, "", zap.NewNop())
	t.Cleanup(keys.Stop)
	v := verifierWith(t, p, keys)
	keys.Start()
	for p.held.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	now := time.Now()
	verified := make(chan error)
	go func() {
		_, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, testKID, claims(p, "a", now), key), now)
		verified <- err
	}()
	time.Sleep(50 * time.Millisecond) // the token waits for the fetch under way
	close(p.hold)
	if err := <-verified; err != nil {
		t.Errorf("a token that came during the first fetch: %v, want it accepted", err)
	}
	if got := p.fetches.Load(); got != 1 {
		t.Errorf("%d fetches, want the first one only", got)
	}
}

// TestUnavailableKeys checks which refusals of an unknown kid are not the
// caller's failure: those whose keys could not be fetched since the token
// came. A token refused on its claims asks for no fetch.
func TestUnavailableKeys(t *testing.T) {
	key, next := rsaKey(t), rsaKey(t)
	p := newProvider(t)
	p.publish(map[string]crypto.Signer{testKID: key})
	v, keys := verifierOf(t, p, func(k *RemoteKeys) { k.spacing = 0 })
	now := time.Now()

	before := p.fetches.Load()
	expired := claims(p, "a", now)
	expired["exp"] = now.Add(-time.Hour).Unix()
	if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, "unknown", expired, next), now); err == nil || errors.Is(err, ErrKeysUnavailable) {
		t.Errorf("an expired token of an unknown kid: %v, want a failure", err)
	}
	if got := p.fetches.Load() - before; got != 0 {
		t.Errorf("an expired token of an unknown kid cost %d fetches, want none", got)
	}
	if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, "unknown", claims(p, "a", now), next), now); err == nil || errors.Is(err, ErrKeysUnavailable) {
		t.Errorf("a kid the provider does not publish, after a fetch: %v, want a failure", err)
	}

	p.setDown(true)
	if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, "next", claims(p, "b", now), next), now); !errors.Is(err, ErrKeysUnavailable) {
		t.Errorf("a new kid while the provider is down: %v, want ErrKeysUnavailable", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := v.Verify(ctx, sign(t, jwt.SigningMethodRS256, "next", claims(p, "c", now), next), now); !errors.Is(err, ErrKeysUnavailable) {
		t.Errorf("a new kid whose caller left: %v, want ErrKeysUnavailable", err)
	}
	// The keys fetched before keep verifying.
	if _, err := v.Verify(t.Context(), sign(t, jwt.SigningMethodRS256, testKID, claims(p, "d", now), key), now); err != nil {
		t.Errorf("a token is refused while the provider is down, with its key fetched before: %v", err)
	}
	if keys.Key(testKID) == nil {
		t.Error("the keys fetched before were dropped by a failed fetch")
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
func acceptedToken(tb testing.TB) (*Verifier, string, time.Time) {
	tb.Helper()
	key := rsaKey(tb)
	p := newProvider(tb)
	p.publish(map[string]crypto.Signer{testKID: key})
	v, _ := verifierOf(tb, p)
	now := time.Now()
	token := sign(tb, jwt.SigningMethodRS256, testKID, claims(p, "alice", now), key)
	if _, err := v.Verify(context.Background(), token, now); err != nil {
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
