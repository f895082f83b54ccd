// Package token verifies bearer JWTs: of the OpenID providers a config
// names, whose key sets it fetches and keeps fresh (RemoteKeys), and of
// the tokens minted here, whose keys the key store holds. A Verifier is
// the identity source of bearer credentials that are not client keys.
//
// It may import caller, caller/clientkey, store (for the token's hash)
// and api.
package token

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/golang-jwt/jwt/v5"
	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/store"
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
	// Refresh looks, within ctx, for the keys published by the time it is
	// called, for a token naming kid, which Key does not know. It returns
	// an error when it could not look (its store or provider failed, or
	// ctx ended), nil when Key now answers what is published.
	Refresh(ctx context.Context, kid string) error
}

// Issuer is an issuer whose tokens are accepted.
type Issuer struct {
	Issuer   string        // the iss claim, compared exactly
	Audience []string      // a token's aud must hold one of these, exactly
	Leeway   time.Duration // the clock skew allowed on exp, nbf and iat
	// StrictExpiry allows no skew on exp, only on nbf and iat: for tokens
	// the proxy signs itself, whose exp is the one it told their holder.
	StrictExpiry bool
	Keys         KeySource
	// Caller names the caller of a verified token from its claims, or
	// refuses the token with false.
	Caller func(claims map[string]any) (caller.Client, bool)
	// Still, when set, is asked again each time a remembered token is
	// used: false refuses it, such as a minted token whose minting key
	// was revoked since. It must not allocate.
	Still func(c caller.Client, now time.Time) bool
}

// Verifier verifies bearer JWTs of its issuers and remembers those it
// accepted until they expire, so that a signature is checked once per
// token rather than once per request. Safe for concurrent use.
type Verifier struct {
	issuers    map[string]*Issuer
	parser     *jwt.Parser
	remembered *lru.Cache[store.Hash, rememberedToken]
}

// rememberedToken is an accepted token, keyed by its hash.
type rememberedToken struct {
	client  caller.Client
	expires int64 // Unix milliseconds: the token's exp
	issuer  *Issuer
	kid     string
	key     *VerificationKey // it is accepted while its issuer still publishes this key
}

// NewVerifier returns a verifier of the issuers' tokens that
// remembers at most remember accepted ones.
func NewVerifier(issuers []*Issuer, remember int) (*Verifier, error) {
	v := &Verifier{
		issuers: make(map[string]*Issuer, len(issuers)),
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
	v.remembered, err = lru.New[store.Hash, rememberedToken](remember)
	return v, err
}

// ErrKeysUnavailable refuses a token of a configured issuer, valid but
// for its signature, naming a kid the keys fetched before lack, when the
// issuer's keys could not be fetched since the token came (the provider
// or the store failed, or the caller left): it may be a valid token, and
// its caller is not at fault.
var ErrKeysUnavailable = errors.New("the issuer's keys could not be fetched for the token's kid")

// Errors of a refused token; callers answer them all alike.
var (
	errTooLong       = errors.New("token longer than MaxTokenSize")
	errTokenHeader   = errors.New("token header has crit, or a kid that is not a string")
	errUnknownIssuer = errors.New("token of an issuer that is not configured")
	errNoKey         = errors.New("no published key of the token's kid fits its alg")
)

// Verify returns the caller a bearer token names: a JWT of a configured
// issuer, signed with a key it publishes, within its validity at now. It
// refuses anything else with an error, which is ErrKeysUnavailable when
// the token might be valid but its key could not be fetched; callers
// answer every refusal alike. A token seen before and still valid costs a
// hash and a lookup, without allocating.
func (v *Verifier) Verify(ctx context.Context, token string, now time.Time) (caller.Client, error) {
	if len(token) > MaxTokenSize {
		return caller.Client{}, errTooLong
	}
	h := hashToken(token)
	if t, ok := v.remembered.Get(h); ok {
		if now.UnixMilli() < t.expires && t.issuer.Keys.Key(t.kid) == t.key &&
			(t.issuer.Still == nil || t.issuer.Still(t.client, now)) {
			return t.client, nil
		}
		v.remembered.Remove(h)
	}
	t, err := v.verify(ctx, token, now)
	if err != nil && t.kid == "" && t.key != nil && errors.Is(err, jwt.ErrTokenSignatureInvalid) {
		// A token without kid is checked with the issuer's one key, which
		// a rotation replaces under the same name: the signature it
		// refuses asks, as an unknown kid does, for the keys published
		// since the token came.
		if err := t.issuer.Keys.Refresh(ctx, ""); err != nil {
			return caller.Client{}, fmt.Errorf("%w: %w", ErrKeysUnavailable, err)
		}
		if t.issuer.Keys.Key("") != t.key {
			t, err = v.verify(ctx, token, now)
		}
	}
	if err != nil {
		return caller.Client{}, err
	}
	v.remembered.Add(h, t)
	return t.client, nil
}

// verify checks a token in full: header, signature, then claims.
func (v *Verifier) verify(ctx context.Context, token string, now time.Time) (rememberedToken, error) {
	var t rememberedToken
	var validated bool // the claims, before a key was fetched
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
		if t.key == nil || kid == "" {
			// A token that would be refused with any key waits for no
			// fetch, and does not ask for one.
			validated = true
			if err := t.issuer.validate(claims, now); err != nil {
				return nil, err
			}
		}
		if t.key == nil {
			if err := t.issuer.Keys.Refresh(ctx, kid); err != nil {
				return nil, fmt.Errorf("%w: %w", ErrKeysUnavailable, err)
			}
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
	if !validated {
		if err := t.issuer.validate(claims, now); err != nil {
			return t, err
		}
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

// validate checks a token's claims against the issuer's settings at now.
func (iss *Issuer) validate(claims jwt.MapClaims, now time.Time) error {
	err := jwt.NewValidator(
		jwt.WithIssuer(iss.Issuer),
		jwt.WithAudience(iss.Audience...),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithLeeway(iss.Leeway),
		jwt.WithTimeFunc(func() time.Time { return now }),
	).Validate(claims)
	if err == nil && iss.StrictExpiry {
		if exp, _ := claims.GetExpirationTime(); !now.Before(exp.Time) {
			return jwt.ErrTokenExpired
		}
	}
	return err
}

// hashToken is the SHA-256 of a token of at most MaxTokenSize bytes;
// copying into an array keeps the conversion to bytes on the stack.
func hashToken(token string) store.Hash {
	var buf [MaxTokenSize]byte
	n := copy(buf[:], token)
	return sha256.Sum256(buf[:n])
}

// Identify makes the verifier the identity source of bearer JWTs: any
// bearer credential not shaped like a client key is verified as one.
func (v *Verifier) Identify(q caller.Request) (caller.Client, caller.Verdict, *api.Error) {
	token, ok := q.Bearer()
	if !ok || clientkey.Valid(token) {
		return caller.Client{}, caller.Pass, nil
	}
	c, err := v.Verify(q.HTTP.Context(), token, q.Now)
	switch {
	case err == nil:
		return c, caller.Found, nil
	case errors.Is(err, ErrKeysUnavailable):
		// It may be valid: refused, but not the caller's failure.
		return caller.Client{}, caller.Unverifiable, nil
	}
	return caller.Client{}, caller.Refused, nil
}
