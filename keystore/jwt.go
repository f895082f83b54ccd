package keystore

import (
	"context"
	"crypto/sha256"
	"errors"
	"slices"
	"time"

	"github.com/golang-jwt/jwt/v5"
	lru "github.com/hashicorp/golang-lru/v2"
)

// MaxTokenSize is the longest bearer token read as a JWT; a longer one is
// refused before it is parsed.
const MaxTokenSize = 8 << 10

// allowedAlgs are the signature algorithms of accepted tokens: public-key
// ones only, so that a published key can never serve as an HMAC secret
// (algorithm confusion), and never "none".
var allowedAlgs = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}

func allowedAlg(alg string) bool { return slices.Contains(allowedAlgs, alg) }

// KeySource holds the keys an issuer signs with.
type KeySource interface {
	// Key returns the key of kid, or nil; it must not allocate.
	Key(kid string) *VerificationKey
	// Refresh looks for keys the source does not know yet, for a token
	// naming an unknown kid, within ctx; it may decline, to bound what
	// made-up kids cost.
	Refresh(ctx context.Context)
}

// TokenIssuer is an issuer whose tokens are accepted.
type TokenIssuer struct {
	Issuer   string        // the iss claim, compared exactly
	Audience []string      // a token's aud must hold one of these, exactly
	Leeway   time.Duration // the clock skew allowed on exp, nbf and iat
	Keys     KeySource
	// Caller names the caller of a verified token from its claims, or
	// refuses the token with false.
	Caller func(claims map[string]any) (Client, bool)
	// Still, when set, is asked again each time a remembered token is
	// used: false refuses it, such as a minted token whose minting key
	// was revoked since. It must not allocate.
	Still func(c Client, now time.Time) bool
}

// TokenVerifier verifies bearer JWTs of its issuers and remembers those it
// accepted until they expire, so that a signature is checked once per
// token rather than once per request. Safe for concurrent use.
type TokenVerifier struct {
	issuers    map[string]*TokenIssuer
	parser     *jwt.Parser
	remembered *lru.Cache[Hash, rememberedToken]
}

// rememberedToken is an accepted token, keyed by its hash.
type rememberedToken struct {
	client  Client
	expires int64 // Unix milliseconds: the token's exp
	issuer  *TokenIssuer
	kid     string
	key     *VerificationKey // it is accepted while its issuer still publishes this key
}

// NewTokenVerifier returns a verifier of the issuers' tokens that
// remembers at most remember accepted ones.
func NewTokenVerifier(issuers []*TokenIssuer, remember int) (*TokenVerifier, error) {
	v := &TokenVerifier{
		issuers: make(map[string]*TokenIssuer, len(issuers)),
		parser: jwt.NewParser(
			jwt.WithValidMethods(allowedAlgs),
			jwt.WithStrictDecoding(),
			jwt.WithoutClaimsValidation(), // done with the issuer's settings once the signature holds
		),
	}
	for _, iss := range issuers {
		if v.issuers[iss.Issuer] != nil {
			return nil, errors.New("issuer given twice: " + iss.Issuer)
		}
		if len(iss.Audience) == 0 {
			return nil, errors.New("issuer without an audience, whose tokens for any app would pass: " + iss.Issuer)
		}
		v.issuers[iss.Issuer] = iss
	}
	var err error
	v.remembered, err = lru.New[Hash, rememberedToken](remember)
	return v, err
}

// Errors of a refused token; callers answer them all alike.
var (
	errTokenHeader   = errors.New("token header has crit, or a kid that is not a string")
	errUnknownIssuer = errors.New("token of an issuer that is not configured")
	errNoKey         = errors.New("no published key of the token's kid fits its alg")
)

// Verify returns the caller a bearer token names: a JWT of a configured
// issuer, signed with a key it publishes, within its validity at now. It
// returns false for anything else, without saying why, as every refused
// credential gets the same answer. A token seen before and still valid
// costs a hash and a lookup, without allocating.
func (v *TokenVerifier) Verify(ctx context.Context, token string, now time.Time) (Client, bool) {
	if len(token) > MaxTokenSize {
		return Client{}, false
	}
	h := hashToken(token)
	if t, ok := v.remembered.Get(h); ok {
		if now.UnixMilli() < t.expires && t.issuer.Keys.Key(t.kid) == t.key &&
			(t.issuer.Still == nil || t.issuer.Still(t.client, now)) {
			return t.client, true
		}
		v.remembered.Remove(h)
	}
	t, err := v.verify(ctx, token, now)
	if err != nil {
		return Client{}, false
	}
	v.remembered.Add(h, t)
	return t.client, true
}

// verify checks a token in full: header, signature, then claims.
func (v *TokenVerifier) verify(ctx context.Context, token string, now time.Time) (rememberedToken, error) {
	var t rememberedToken
	claims := jwt.MapClaims{}
	_, err := v.parser.ParseWithClaims(token, claims, func(tok *jwt.Token) (any, error) {
		kid, ok := tok.Header["kid"].(string)
		if _, crit := tok.Header["crit"]; crit || !ok && tok.Header["kid"] != nil {
			return nil, errTokenHeader // no extension of ours is critical
		}
		// The unverified iss only picks the keys; it is checked once
		// the signature holds.
		iss, _ := claims["iss"].(string)
		t.issuer = v.issuers[iss]
		if t.issuer == nil {
			return nil, errUnknownIssuer
		}
		t.kid, t.key = kid, t.issuer.Keys.Key(kid)
		if t.key == nil {
			t.issuer.Keys.Refresh(ctx)
			t.key = t.issuer.Keys.Key(kid)
		}
		if t.key == nil || !t.key.fits(tok.Method.Alg()) {
			return nil, errNoKey
		}
		return t.key.Key, nil
	})
	if err != nil {
		return t, err
	}
	err = jwt.NewValidator(
		jwt.WithIssuer(t.issuer.Issuer),
		jwt.WithAudience(t.issuer.Audience...),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(t.issuer.Leeway),
		jwt.WithTimeFunc(func() time.Time { return now }),
	).Validate(claims)
	if err != nil {
		return t, err
	}
	exp, err := claims.GetExpirationTime()
	if err != nil {
		return t, err
	}
	t.expires = exp.UnixMilli()
	var ok bool
	if t.client, ok = t.issuer.Caller(claims); !ok {
		return t, errors.New("the issuer's settings refuse the token's caller")
	}
	return t, nil
}

// hashToken is the SHA-256 of a token of at most MaxTokenSize bytes;
// copying into an array keeps the conversion to bytes on the stack.
func hashToken(token string) Hash {
	var buf [MaxTokenSize]byte
	n := copy(buf[:], token)
	return sha256.Sum256(buf[:n])
}
