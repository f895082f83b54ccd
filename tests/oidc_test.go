package tests

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/vigthoria/caddy-vigthoria/caller/token"
	"github.com/zitadel/oidc/v3/example/server/storage"
	zcrypto "github.com/zitadel/oidc/v3/pkg/crypto"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
	"golang.org/x/oauth2/clientcredentials"
)

// opAudience is the audience the test provider's tokens are for.
const opAudience = "vigthoria-test"

// openIDProvider is zitadel's certified OpenID provider (pkg/op) with the
// in-memory storage of its example, on a loopback port. Each end user of
// a test is a client of it that gets JWT access tokens by the client
// credentials grant, with the user's plan as a claim. Its signing key can
// be rotated, and signs at once; every key it made stays published, with
// Cache-Control: no-store, as Ory Hydra publishes its keys.
type openIDProvider struct {
	*storage.Storage
	srv          *httptest.Server
	issuer       string
	keyFetches   atomic.Int64
	lastKeyFetch atomic.Int64 // Unix nanoseconds
	mu           sync.Mutex   // protects following fields
	keys         []*opKey     // the last one signs
	plans        map[string]string
	stopped      bool
}

// opSecret is the client secret of every user of the provider.
const opSecret = "secret"

// opKey is an RSA signing key of the provider, in both of zitadel's roles.
type opKey struct {
	id  string
	key *rsa.PrivateKey
}

func (k *opKey) SignatureAlgorithm() jose.SignatureAlgorithm { return jose.RS256 }
func (k *opKey) Algorithm() jose.SignatureAlgorithm          { return jose.RS256 }
func (k *opKey) Use() string                                 { return "sig" }
func (k *opKey) ID() string                                  { return k.id }
func (k *opKey) Key() any                                    { return k.key }

// publicKey is an opKey as its key set publishes it.
type publicKey struct{ *opKey }

func (k publicKey) Key() any { return &k.key.PublicKey }

// startOpenIDProvider starts the provider, whose users are the keys of
// plans (a user without a plan is "").
func startOpenIDProvider(t *testing.T, plans map[string]string) *openIDProvider {
	t.Helper()
	p := &openIDProvider{plans: plans}
	p.srv = httptest.NewUnstartedServer(nil)
	p.issuer = "http://" + p.srv.Listener.Addr().String()
	p.Storage = storage.NewStorage(storage.NewUserStore(p.issuer))
	p.rotate(t)
	var cryptoKey [32]byte
	rand.Read(cryptoKey[:])
	provider, err := op.NewProvider(&op.Config{CryptoKey: cryptoKey}, p, op.StaticIssuer(p.issuer), op.WithAllowInsecure())
	if err != nil {
		t.Fatal(err)
	}
	p.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/keys" {
			p.keyFetches.Add(1)
			p.lastKeyFetch.Store(time.Now().UnixNano())
			w.Header().Set("Cache-Control", "no-store")
		}
		provider.ServeHTTP(w, r)
	})
	p.srv.Start()
	t.Cleanup(p.stop)
	return p
}

// rotate makes a new signing key; the old ones stay published.
func (p *openIDProvider) rotate(t *testing.T) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.keys = append(p.keys, &opKey{id: rand.Text(), key: key})
}

func (p *openIDProvider) signingKey() *opKey {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.keys[len(p.keys)-1]
}

// stop takes the provider down, as an outage would.
func (p *openIDProvider) stop() {
	p.mu.Lock()
	stopped := p.stopped
	p.stopped = true
	p.mu.Unlock()
	if !stopped {
		p.srv.Close()
	}
}

// SigningKey, SignatureAlgorithms and KeySet replace the example
// storage's one static key by the rotating ones.
func (p *openIDProvider) SigningKey(context.Context) (op.SigningKey, error) {
	return p.signingKey(), nil
}

func (p *openIDProvider) SignatureAlgorithms(context.Context) ([]jose.SignatureAlgorithm, error) {
	return []jose.SignatureAlgorithm{jose.RS256}, nil
}

func (p *openIDProvider) KeySet(context.Context) ([]op.Key, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	keys := make([]op.Key, len(p.keys))
	for i, k := range p.keys {
		keys[i] = publicKey{k}
	}
	return keys, nil
}

// ClientCredentials and ClientCredentialsTokenRequest make each user a
// client that gets JWT access tokens for opAudience.
func (p *openIDProvider) ClientCredentials(_ context.Context, clientID, clientSecret string) (op.Client, error) {
	if _, ok := p.plans[clientID]; !ok || clientSecret != opSecret {
		return nil, errors.New("wrong client or secret")
	}
	return jwtClient{storage.WebClient(clientID, clientSecret)}, nil
}

func (p *openIDProvider) ClientCredentialsTokenRequest(_ context.Context, clientID string, scopes []string) (op.TokenRequest, error) {
	return &oidc.JWTTokenRequest{Subject: clientID, Audience: []string{opAudience}, Scopes: scopes}, nil
}

// GetPrivateClaimsFromScopes adds the user's plan to its tokens.
func (p *openIDProvider) GetPrivateClaimsFromScopes(_ context.Context, userID, _ string, _ []string) (map[string]any, error) {
	if plan := p.plans[userID]; plan != "" {
		return map[string]any{"plan": plan}, nil
	}
	return nil, nil
}

// jwtClient is a client of the client credentials grant with JWT access
// tokens.
type jwtClient struct{ *storage.Client }

func (jwtClient) GrantTypes() []oidc.GrantType {
	return []oidc.GrantType{oidc.GrantTypeClientCredentials}
}
func (jwtClient) AccessTokenType() op.AccessTokenType { return op.AccessTokenTypeJWT }

// token gets an access token of user from the provider's token endpoint,
// as the user's app would.
func (p *openIDProvider) token(t *testing.T, user string) string {
	t.Helper()
	cfg := clientcredentials.Config{ClientID: user, ClientSecret: opSecret, TokenURL: p.issuer + "/oauth/token"}
	tok, err := cfg.Token(t.Context())
	if err != nil {
		t.Fatalf("token of %s: %v", user, err)
	}
	if strings.Count(tok.AccessToken, ".") != 2 {
		t.Fatalf("the provider gave %s an access token that is not a JWT", user)
	}
	return tok.AccessToken
}

// signed signs claims with the provider's signing key through its own
// signer, for tokens its endpoints would not give (expired, for another
// audience…).
func (p *openIDProvider) signed(t *testing.T, claims map[string]any) string {
	t.Helper()
	signer, err := op.SignerFromKey(p.signingKey())
	if err != nil {
		t.Fatal(err)
	}
	s, err := zcrypto.Sign(claims, signer)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// claims are valid claims of the provider's for user.
func (p *openIDProvider) claims(user string) map[string]any {
	now := time.Now()
	return map[string]any{"iss": p.issuer, "aud": []string{opAudience}, "sub": user,
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(5 * time.Minute).Unix()}
}

// callerID is the proxy's name for a user of the provider.
func (p *openIDProvider) callerID(user string) string {
	return "jwt:" + strings.TrimPrefix(p.issuer, "http://") + ":" + user
}

// startWithOpenIDProvider starts a provider with the users of plans, and
// Caddy accepting its tokens: tier "user" (2 requests a minute) by
// default, "plus" when the token's plan claim says so; with the extra
// lines.
func startWithOpenIDProvider(t *testing.T, plans map[string]string, extra ...string) (*env, *openIDProvider) {
	t.Helper()
	p := startOpenIDProvider(t, plans)
	e := start(t, append(openIDLines(p), extra...)...)
	return e, p
}

// openIDLines configure the tiers of startWithOpenIDProvider and p's
// issuer.
func openIDLines(p *openIDProvider) []string {
	return []string{
		"tier user {\n\t\t\trequests 2/1m\n\t\t}",
		"tier plus {\n\t\t\trequests 100/1m\n\t\t}",
		"jwt " + p.issuer + " {\n\t\t\taudience " + opAudience + "\n\t\t\ttier_claim plan\n\t\t\ttier user\n\t\t}",
	}
}

// TestOpenIDProviderUsers checks that end users signed in with a real
// OpenID provider call with its tokens through the official client, each
// with its own limits, tier and usage, and that no token reaches the
// upstream or the access log.
func TestOpenIDProviderUsers(t *testing.T) {
	e, p := startWithOpenIDProvider(t, map[string]string{"alice": "", "bob": "", "carol": "plus", "dave": "gold"}, manyFailures)
	alice := p.token(t, "alice")
	client := newClient(e.caddy.URL, alice)

	// The provider's keys are fetched in the background once Caddy runs.
	chatsWithin(t, client, 10*time.Second, "alice's first chat")
	if got := p.keyFetches.Load(); got < 1 {
		t.Errorf("the provider's keys were fetched %d times, want at least once", got)
	}
	// A token's signature is its own: what must never show anywhere.
	signature := func(token string) string { return token[strings.LastIndexByte(token, '.')+1:] }
	r := e.lastRequest(t)
	if got := r.Header.Get("Authorization"); got != "Bearer "+serverKey {
		t.Errorf("upstream Authorization = %q, want the server key", got)
	}
	for name, values := range r.Header {
		if strings.Contains(strings.Join(values, " "), signature(alice)) {
			t.Errorf("the token reached the upstream in %s", name)
		}
	}
	if strings.Contains(string(r.Body), signature(alice)) || strings.Contains(r.RawQuery, signature(alice)) {
		t.Error("the token reached the upstream in the body or query")
	}

	// Per-user limits: alice's 2 requests a minute are spent, bob's are not.
	_, err := client.Chat.Completions.New(t.Context(), chatParams("again"))
	if err != nil {
		t.Fatalf("alice's second request: %v", err)
	}
	_, err = client.Chat.Completions.New(t.Context(), chatParams("a third"))
	wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded")
	bob := newClient(e.caddy.URL, p.token(t, "bob"))
	if _, err := bob.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
		t.Fatalf("bob is refused after alice spent her limit: %v", err)
	}

	// The tier from the plan claim, when it names a configured tier.
	carol := p.token(t, "carol")
	carolClient := newClient(e.caddy.URL, carol)
	for range 3 {
		if _, err := carolClient.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
			t.Fatalf("carol, of tier plus: %v", err)
		}
	}
	u, _ := e.usage(t, carol)
	if u.Tier != "plus" || u.ClientID != p.callerID("carol") || u.Limits.Requests == nil || u.Limits.Requests.Limit != 100 {
		t.Errorf("carol's usage: client %q tier %q limits %+v, want %s of tier plus, 100 requests", u.ClientID, u.Tier, u.Limits.Requests, p.callerID("carol"))
	}
	if u, _ := e.usage(t, p.token(t, "dave")); u.Tier != "user" {
		t.Errorf("dave, whose plan names no configured tier, is of tier %q, want the default user", u.Tier)
	}

	// GET /v1/usage: carol's own requests, in the ledger under her ID.
	eventually(t, "carol's usage counts her 3 chats", func() bool {
		u, _ := e.usage(t, carol)
		return u.Today.Requests == 3 && u.Today.TotalTokens > 0
	})
	// The operator's view: the ledger, written once a second.
	eventually10s(t, "caddy vigthoria usage "+p.callerID("carol")+" shows her 3 chats", func() bool {
		return strings.Contains(e.cli(t, "usage", p.callerID("carol")), p.callerID("carol")+"  ")
	})
	if out := e.cli(t, "usage", p.callerID("carol")); !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(p.callerID("carol")) + `\s+\S+\s+` + model + `\s+3\s`).MatchString(out) {
		t.Errorf("caddy vigthoria usage printed %q, want a row of carol's 3 chats", out)
	}
	if u, _ := e.usage(t, p.token(t, "bob")); u.ClientID != p.callerID("bob") || u.Today.Requests > 1 {
		t.Errorf("bob's usage: %s with %d requests, want his own 1 at most", u.ClientID, u.Today.Requests)
	}

	if !e.caddy.WaitLog(t, `"user_id":"`+p.callerID("alice")+`"`) {
		t.Error("the access log does not name alice as the user")
	}
	if log := e.caddy.ReadLog(t); strings.Contains(log, signature(alice)) || strings.Contains(log, signature(carol)) {
		t.Error("a token appears in Caddy's log")
	}
}

// TestOpenIDRefusals checks that each bad token gets the one 401 of a bad
// key, byte for byte, and that a token in the URL is refused like a key.
func TestOpenIDRefusals(t *testing.T) {
	e, p := startWithOpenIDProvider(t, map[string]string{"alice": ""}, manyFailures)
	good := p.token(t, "alice")
	eventually10s(t, "the provider's token is accepted", func() bool {
		return e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + good}}).StatusCode == http.StatusOK
	})
	badKey := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer vgt_" + strings.Repeat("A", 38)}})
	wantBody, _ := io.ReadAll(badKey.Body)

	with := func(change func(map[string]any)) string {
		c := p.claims("alice")
		change(c)
		return p.signed(t, c)
	}
	stranger, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, _ := x509.MarshalPKIXPublicKey(&p.signingKey().key.PublicKey)
	publicPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	kid := p.signingKey().id
	parts := strings.Split(good, ".")
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	changed := bytes.Replace(payload, []byte(`"alice"`), []byte(`"admin"`), 1)

	for name, token := range map[string]string{
		"expired":                       with(func(c map[string]any) { c["exp"] = time.Now().Add(-time.Minute).Unix() }),
		"not yet valid":                 with(func(c map[string]any) { c["nbf"] = time.Now().Add(2 * time.Minute).Unix() }),
		"wrong aud":                     with(func(c map[string]any) { c["aud"] = "another-app" }),
		"wrong iss":                     with(func(c map[string]any) { c["iss"] = "http://127.0.0.2:1" }),
		"payload changed after signing": parts[0] + "." + base64.RawURLEncoding.EncodeToString(changed) + "." + parts[2],
		"alg none":                      signWith(t, jwt.SigningMethodNone, kid, p.claims("alice"), jwt.UnsafeAllowNoneSignatureType),
		"HS256 with the public key":     signWith(t, jwt.SigningMethodHS256, kid, p.claims("alice"), publicPEM),
		"a key never published":         signWith(t, jwt.SigningMethodRS256, kid, p.claims("alice"), stranger),
		"an unknown kid":                signWith(t, jwt.SigningMethodRS256, "not-published", p.claims("alice"), stranger),
		"oversized":                     with(func(c map[string]any) { c["pad"] = strings.Repeat("x", token.MaxTokenSize) }),
	} {
		t.Run(name, func(t *testing.T) {
			res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + token}})
			body, _ := io.ReadAll(res.Body)
			if res.StatusCode != http.StatusUnauthorized || !bytes.Equal(body, wantBody) {
				t.Errorf("got %d %s, want the 401 of a bad key: %s", res.StatusCode, body, wantBody)
			}
		})
	}

	for _, query := range []string{"access_token=" + good, "t=" + good, "t=" + url.QueryEscape("%65"+good[1:])} {
		res := e.do(t, http.MethodGet, "/v1/models?"+query, nil, http.Header{"Authorization": nil})
		wantAPIError(t, res, http.StatusBadRequest, "key_in_query")
	}
	e.wantUpstreamCalls(t, 1) // the models list of the first, good token
}

// TestOpenIDUnverifiedEmailIsRefused: with user_claim email, a token
// names its caller by its e-mail only when the provider says it verified
// it. A user who puts someone else's address on an account of the
// provider, unverified, gets the one 401 of a bad key, not the owner's
// limits and usage. Provisioning warns that only sub is unique.
func TestOpenIDUnverifiedEmailIsRefused(t *testing.T) {
	p := startOpenIDProvider(t, nil)
	e := start(t, manyFailures, "tier user {\n\t\t\trequests 100/1h\n\t\t}",
		"jwt "+p.issuer+" {\n\t\t\taudience "+opAudience+"\n\t\t\tuser_claim email\n\t\t\ttier user\n\t\t}")
	const email = "victim@example.com"
	token := func(sub string, verified any) string {
		c := p.claims(sub)
		c["email"] = email
		if verified != nil {
			c["email_verified"] = verified
		}
		return p.signed(t, c)
	}
	victim := token("victim", true)
	eventually10s(t, "the victim's verified token is accepted", func() bool {
		status, _ := e.chatStatus(t, "Bearer "+victim)
		return status == http.StatusOK
	})
	_, bad := e.chatStatus(t, "Bearer vgt_not-a-key")
	for name, verified := range map[string]any{
		"false": false, "missing": nil, `the string "false"`: "false", `the string "True"`: "True", "1": 1, "an object": map[string]any{},
	} {
		t.Run(name, func(t *testing.T) {
			status, body := e.chatStatus(t, "Bearer "+token("mallory", verified))
			if status != http.StatusUnauthorized || !bytes.Equal(body, bad) {
				t.Errorf("email_verified %v: %d %s, want the one 401 of a bad key %s", verified, status, body, bad)
			}
		})
	}
	// Some providers (Sign in with Apple) send the string "true".
	if u, _ := e.usage(t, token("victim", "true")); u.ClientID != p.callerID(email) {
		t.Errorf(`email_verified "true": the caller is %q, want %q`, u.ClientID, p.callerID(email))
	}
	eventually(t, "the victim's usage holds its own chat only", func() bool {
		u, _ := e.usage(t, victim)
		return u.Today.Requests == 1
	})
	if !e.caddy.WaitLog(t, "only sub is unique and stable") {
		t.Error("no warning at provision that user_claim email is not sub")
	}
}

// TestBadTokensAreThrottled checks that refused tokens count as failed
// authentications, and that the throttle does not refuse a valid token.
func TestBadTokensAreThrottled(t *testing.T) {
	e, p := startWithOpenIDProvider(t, map[string]string{"alice": ""}, "auth_failures 3/1m")
	good := p.token(t, "alice")
	for range 3 {
		res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + good[:len(good)-4]}})
		wantAPIError(t, res, http.StatusUnauthorized, "invalid_api_key")
	}
	res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + good[:len(good)-4]}})
	wantAPIError(t, res, http.StatusTooManyRequests, "too_many_failed_auth")
	eventually10s(t, "a valid token from the throttled address is accepted", func() bool {
		return e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + good}}).StatusCode == http.StatusOK
	})
}

// TestOpenIDKeyRotationAndOutage checks that a rotated key (new kid) is
// picked up without a reload, and that tokens keep working with the keys
// fetched before while the provider is down.
func TestOpenIDKeyRotationAndOutage(t *testing.T) {
	e, p := startWithOpenIDProvider(t, map[string]string{"alice": "plus", "bob": "plus"}, manyFailures)
	first := p.token(t, "alice")
	eventually10s(t, "the provider's token is accepted", func() bool {
		return e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + first}}).StatusCode == http.StatusOK
	})
	fetches := p.keyFetches.Load()

	p.rotate(t)
	rotated := newClient(e.caddy.URL, p.token(t, "bob"))
	// The first token of the new kid waits for a fetch that begins after
	// it came, however recent the last one was.
	if _, err := rotated.Chat.Completions.New(t.Context(), chatParams("rotated")); err != nil {
		t.Fatalf("a chat with a token of the rotated key: %v", err)
	}
	if got := p.keyFetches.Load() - fetches; got != 1 {
		t.Errorf("the rotation cost %d key fetches, want 1", got)
	}

	// Unused until the provider is down: accepted through the fetched
	// keys, not a remembered verification.
	unused := newClient(e.caddy.URL, p.token(t, "alice"))
	p.stop()
	if _, err := unused.Chat.Completions.New(t.Context(), chatParams("provider down")); err != nil {
		t.Errorf("a token of a fetched key is refused while the provider is down: %v", err)
	}
	firstClient := newClient(e.caddy.URL, first)
	if _, err := firstClient.Chat.Completions.New(t.Context(), chatParams("still")); err != nil {
		t.Errorf("a token of the old key is refused while the provider is down: %v", err)
	}

	// A reload with the same issuer keeps the keys, without the provider.
	e.reload(t, append(openIDLines(p), manyFailures, "max_body 2MB")...)
	// The client's retry covers a connection the old server closes.
	if _, err := unused.Chat.Completions.New(t.Context(), chatParams("after reload"), option.WithMaxRetries(2)); err != nil {
		t.Errorf("after a reload, while the provider is down: %v", err)
	}
}

// TestOpenIDRotationNeverLocksUsersOut rotates the provider's key 0.5 s,
// 2 s and 5 s after the proxy's last fetch of its keys, and uses tokens
// of the new key at once, as an app does the moment the provider gives
// them: each request is accepted, none refused or throttled. Then a
// stranger's burst of tokens of the issuer naming made-up kids costs at
// most one fetch a second, and leaves the proxy accepting the users.
func TestOpenIDRotationNeverLocksUsersOut(t *testing.T) {
	users := []string{"u0", "u1", "u2"}
	plans := map[string]string{}
	for _, u := range users {
		plans[u] = "plus"
	}
	e, p := startWithOpenIDProvider(t, plans)
	first := p.token(t, "u0")
	eventually10s(t, "the provider's token is accepted", func() bool {
		return e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + first}}).StatusCode == http.StatusOK
	})

	statuses := map[string]int{}
	var mu sync.Mutex
	for _, after := range []time.Duration{500 * time.Millisecond, 2 * time.Second, 5 * time.Second} {
		time.Sleep(time.Until(time.Unix(0, p.lastKeyFetch.Load()).Add(after)))
		p.rotate(t)
		var wg sync.WaitGroup
		for _, u := range users {
			token := p.token(t, u)
			for range 4 {
				wg.Go(func() {
					status, code := getModels(e.caddy.URL, token)
					mu.Lock()
					statuses[strconv.Itoa(status)+" "+code]++
					mu.Unlock()
				})
			}
		}
		wg.Wait()
	}
	if len(statuses) != 1 || statuses["200 "] != 3*len(users)*4 {
		t.Errorf("tokens of a key rotated 0.5 s, 2 s and 5 s after the last fetch got %v, want 200 for every one of %d", statuses, 3*len(users)*4)
	}

	// A stranger's tokens of the issuer naming made-up kids, all at once.
	stranger, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	const burst = 200
	forged := make([]string, burst)
	for i := range forged {
		forged[i] = signWith(t, jwt.SigningMethodES256, rand.Text(), p.claims("u1"), stranger)
	}
	fetches, began := p.keyFetches.Load(), time.Now()
	refused := map[string]int{}
	var wg sync.WaitGroup
	for _, token := range forged {
		wg.Go(func() {
			status, code := getModels(e.caddy.URL, token)
			mu.Lock()
			refused[strconv.Itoa(status)+" "+code]++
			mu.Unlock()
		})
	}
	wg.Wait()
	took := time.Since(began)
	if refused["401 invalid_api_key"]+refused["429 too_many_failed_auth"] != burst {
		t.Errorf("tokens of made-up kids got %v, want each refused", refused)
	}
	if got, most := p.keyFetches.Load()-fetches, int64(took/time.Second)+2; got > most {
		t.Errorf("%d tokens of made-up kids in %s cost %d key fetches, want at most %d (one a second)", burst, took, got, most)
	}
	t.Logf("rotations: %v; %d made-up kids in %s: %v, %d key fetches", statuses, burst, took.Round(time.Millisecond), refused, p.keyFetches.Load()-fetches)
	if status, code := getModels(e.caddy.URL, p.token(t, "u2")); status != http.StatusOK {
		t.Errorf("a user's token after the stranger's burst, from the same address: %d %s, want 200", status, code)
	}
}

// TestUnfetchableKeysAreNotFailures: while the provider cannot be
// reached, tokens of a kid the proxy has not fetched may be valid: they
// are refused with the one 401, but not counted against the caller's
// address, whose user is never throttled for the provider's outage.
// A token of a fetched key signed by a stranger still counts.
func TestUnfetchableKeysAreNotFailures(t *testing.T) {
	e, p := startWithOpenIDProvider(t, map[string]string{"alice": "plus"}, "auth_failures 3/1m")
	first := p.token(t, "alice")
	eventually10s(t, "the provider's token is accepted", func() bool {
		return e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + first}}).StatusCode == http.StatusOK
	})
	p.rotate(t)
	unfetched := p.signed(t, p.claims("alice"))
	p.stop()
	got := map[string]int{}
	for range 4 {
		status, code := getModels(e.caddy.URL, unfetched)
		got[strconv.Itoa(status)+" "+code]++
	}
	if got["401 invalid_api_key"] != 4 {
		t.Errorf("tokens of a kid not yet fetched while the provider is down got %v, want 401 ×4, none throttled", got)
	}
	stranger, _ := rsa.GenerateKey(rand.Reader, 2048)
	forged := signWith(t, jwt.SigningMethodRS256, p.keys[0].id, p.claims("alice"), stranger)
	for range 3 {
		getModels(e.caddy.URL, forged)
	}
	if status, code := getModels(e.caddy.URL, forged); status != http.StatusTooManyRequests {
		t.Errorf("a fourth forged token of a fetched kid: %d %s, want 429 too_many_failed_auth", status, code)
	}
}

// getModels lists the models with a bearer token and returns the status
// and the error code of the answer, if any; safe in any goroutine.
func getModels(baseURL, token string) (int, string) {
	req, _ := http.NewRequest(http.MethodGet, baseURL+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer res.Body.Close()
	var e apiError
	json.NewDecoder(res.Body).Decode(&e)
	return res.StatusCode, e.Error.Code
}

// TestJWTConfigIsChecked checks what validation refuses of jwt issuers,
// and that validating fetches nothing from the provider.
func TestJWTConfigIsChecked(t *testing.T) {
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	defer srv.Close()
	block := func(issuer string, lines ...string) string {
		return "jwt " + issuer + " {\n\t\t\t" + strings.Join(lines, "\n\t\t\t") + "\n\t\t}"
	}
	for name, tc := range map[string]struct {
		lines []string
		want  string
	}{
		"valid":                {[]string{"tier free", block(srv.URL, "audience a", "tier free")}, ""},
		"http off loopback":    {[]string{"tier free", block("http://auth.example.com", "audience a", "tier free")}, "not https"},
		"no tier":              {[]string{"tier free", block(srv.URL, "audience a")}, "needs a tier"},
		"unknown tier":         {[]string{"tier free", block(srv.URL, "audience a", "tier gold")}, "not configured"},
		"same host twice":      {[]string{"tier free", block(srv.URL+"/a", "audience a", "tier free"), block(srv.URL+"/b", "audience a", "tier free")}, "share the host"},
		"http jwks_url":        {[]string{"tier free", block(srv.URL, "audience a", "tier free", "jwks_url http://keys.example.com/jwks")}, "not https"},
		"too much leeway":      {[]string{"tier free", block(srv.URL, "audience a", "tier free", "leeway 1h")}, "leeway"},
		"tier claim, no tier":  {[]string{"tier free", block(srv.URL, "audience a", "tier_claim plan")}, ""},
		"https issuer, remote": {[]string{"tier free", block("https://tenant.auth0.com/", "audience a", "tier free")}, ""},
		"minted tokens of 24h": {[]string{"tier free", "max_token_ttl 24h"}, ""},
		"minted tokens of 25h": {[]string{"tier free", "max_token_ttl 25h"}, "max_token_ttl must be between 1s and 24h"},
	} {
		err := validate(t, tc.lines...)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: validate said %v, want %q", name, err, tc.want)
		}
	}
	if hits.Load() != 0 {
		t.Errorf("validating fetched from the provider %d times, want never", hits.Load())
	}
}

// signWith signs claims with key by method, naming kid.
func signWith(t *testing.T, method jwt.SigningMethod, kid string, claims map[string]any, key any) string {
	t.Helper()
	tok := jwt.NewWithClaims(method, jwt.MapClaims(claims))
	tok.Header["kid"] = kid
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// chatsWithin asserts that client's chat is accepted within d, trying
// again while it is refused.
func chatsWithin(t *testing.T, client openai.Client, d time.Duration, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		_, err := client.Chat.Completions.New(t.Context(), chatParams(what))
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still refused after %s: %v", what, d, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func eventually10s(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitFor(t, 10*time.Second, what, cond)
}
