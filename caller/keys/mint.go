package keys

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/vigthoria/caddy-vigthoria/caller/token"
	"github.com/vigthoria/caddy-vigthoria/store"
	"go.uber.org/zap"
)

// Tokens the proxy mints for an app's backend (POST /vigthoria/tokens)
// name this issuer and audience. An OpenID issuer is an https URL, so no
// configured issuer can take this one's place.
const (
	MintIssuer   = "caddy-vigthoria"
	MintAudience = "vigthoria"
)

// How a Service keeps up with the store's signing keys.
const (
	// signingPoll is how often the signing keys are read again once
	// minting or verifying began: a rotation made elsewhere signs within
	// it and a poll.
	signingPoll = 500 * time.Millisecond
	// minSigningRefresh spaces reads for a token naming an unknown kid,
	// so that made-up kids cost the store little.
	minSigningRefresh = time.Second
)

// ErrNoSigningKeys is returned when a store cannot keep signing keys.
var ErrNoSigningKeys = errors.New("this key store keeps no signing keys")

// TokenRequest is what a token is minted with; the caller checked it.
type TokenRequest struct {
	User   string
	Tier   string
	Models []string
	KeyID  string // the minting key
	TTL    time.Duration
}

// mintedClaims are the claims of a minted token.
type mintedClaims struct {
	Tier   string   `json:"tier"`
	Models []string `json:"models,omitempty"`
	KeyID  string   `json:"key_id"`
	jwt.RegisteredClaims
}

// signingSet is one reading of the store's signing keys; never changed
// once published.
type signingSet struct {
	keys  []store.SigningKey // oldest first
	byKID map[string]*signingEntry
	jwks  []byte // the public keys, as GET /vigthoria/jwks.json serves them
}

type signingEntry struct {
	key     token.VerificationKey
	retired int64 // unix milliseconds when a newer key took over (Retired); 0 for the newest
}

// signing keeps the Service's copy of the signing keys.
type signing struct {
	set atomic.Pointer[signingSet] // nil until first read

	mu       sync.Mutex // serializes reads and key creation; protects the following
	used     bool       // minting or verifying began: keep the keys fresh
	lastRead time.Time
}

// Mint signs a token for req at now with the signing key that signs then
// (see signer), making the store's first one when it has none. It
// returns the token and when it expires: after req.TTL, or when the
// minting key does if that is sooner.
func (s *Service) Mint(ctx context.Context, req TokenRequest, now time.Time) (string, time.Time, error) {
	set, err := s.signingKeys(ctx)
	if err != nil {
		return "", time.Time{}, err
	}
	if len(set.keys) == 0 {
		if set, err = s.firstSigningKey(ctx, now); err != nil {
			return "", time.Time{}, err
		}
	}
	key := Signer(set.keys, now)
	var jti [16]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", time.Time{}, err
	}
	// A token never outlives its minting key.
	expires := now.Add(req.TTL)
	if m, ok := s.index.minter(req.KeyID); ok && m.expires != 0 && expires.UnixMilli() > m.expires {
		expires = time.UnixMilli(m.expires)
	}
	expires = expires.Truncate(time.Second)
	claims := mintedClaims{
		Tier:   req.Tier,
		Models: req.Models,
		KeyID:  req.KeyID,
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    MintIssuer,
			Subject:   req.User,
			Audience:  jwt.ClaimStrings{MintAudience},
			ExpiresAt: jwt.NewNumericDate(expires),
			IssuedAt:  jwt.NewNumericDate(now.Truncate(time.Second)),
			ID:        base64.RawURLEncoding.EncodeToString(jti[:]),
		},
	}
	tok := jwt.NewWithClaims(jwt.SigningMethodEdDSA, claims)
	tok.Header["kid"] = key.ID
	signed, err := tok.SignedString(key.Private)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("signing a token: %w", err)
	}
	return signed, expires, nil
}

// JWKS returns the public keys that verify minted tokens, as a JSON Web
// Key Set, reading them from the store the first time.
func (s *Service) JWKS(ctx context.Context) ([]byte, error) {
	set, err := s.signingKeys(ctx)
	if err != nil {
		return nil, err
	}
	return set.jwks, nil
}

// MintKeys returns the keys that verify minted tokens, for a
// TokenVerifier. A key that stopped signing verifies for maxTTL more,
// the longest life of a token it signed, and no longer, so that an old
// key cannot sign tokens for ever.
func (s *Service) MintKeys(maxTTL time.Duration) token.KeySource {
	return mintKeys{s: s, maxTTL: maxTTL.Milliseconds()}
}

type mintKeys struct {
	s      *Service
	maxTTL int64 // milliseconds
}

// Key returns the signing key kid while it verifies, or nil. It does not
// allocate.
func (m mintKeys) Key(kid string) *token.VerificationKey {
	set := m.s.signing.set.Load()
	if set == nil {
		return nil
	}
	e := set.byKID[kid]
	if e == nil || e.retired != 0 && time.Now().UnixMilli() >= e.retired+m.maxTTL {
		return nil
	}
	return &e.key
}

// Refresh reads the signing keys again for a token of an unknown kid,
// and waits for them: the store is read at most once a second, and one
// read answers every token that waited for it. A store that keeps no
// signing keys was looked at all the same: none of its tokens is valid.
func (m mintKeys) Refresh(ctx context.Context, _ string) error {
	err := m.s.refreshSigningKeys(ctx)
	if errors.Is(err, ErrNoSigningKeys) {
		return nil
	}
	if err != nil && ctx.Err() == nil {
		m.s.logger.Warn("reading the signing keys of minted tokens", zap.Error(err))
	}
	return err
}

// Minter returns the tier of key id and the tiers it may mint tokens of,
// when it is live at now and may mint. It takes no lock and allocates
// nothing.
func (s *Service) Minter(id string, now time.Time) (tier string, mint []string, ok bool) {
	if s.stale.Load() {
		return "", nil, false
	}
	m, ok := s.index.minter(id)
	if !ok || m.expires != 0 && now.UnixMilli() >= m.expires {
		return "", nil, false
	}
	return m.tier, m.mint, true
}

var errRecentRead = errors.New("signing keys read within the last second")

// signingKeys returns the signing keys, reading them when none were yet,
// at most once a second: a failing store is not asked once per request.
func (s *Service) signingKeys(ctx context.Context) (*signingSet, error) {
	if set := s.signing.set.Load(); set != nil {
		return set, nil
	}
	err := s.readSigningKeys(ctx)
	if set := s.signing.set.Load(); set != nil {
		return set, nil
	}
	if err == nil || errors.Is(err, errRecentRead) {
		err = errors.New("the signing keys could not be read in the last second")
	}
	return nil, err
}

// readSigningKeys reads the store's signing keys and publishes them,
// unless the last read was within minSigningRefresh.
func (s *Service) readSigningKeys(ctx context.Context) error {
	s.signing.mu.Lock()
	defer s.signing.mu.Unlock()
	s.signing.used = true
	if time.Since(s.signing.lastRead) < minSigningRefresh {
		return errRecentRead
	}
	return s.readSigningKeysLocked(ctx)
}

// refreshSigningKeys waits for a read of the signing keys that begins
// after it was called, making one at most minSigningRefresh after the
// last.
func (s *Service) refreshSigningKeys(ctx context.Context) error {
	asked := time.Now()
	s.signing.mu.Lock()
	defer s.signing.mu.Unlock()
	s.signing.used = true
	if s.signing.lastRead.After(asked) {
		return nil // a read that began since answered it
	}
	if wait := time.Until(s.signing.lastRead.Add(minSigningRefresh)); wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return s.readSigningKeysLocked(ctx)
}

func (s *Service) readSigningKeysLocked(ctx context.Context) error {
	st := s.Store()
	if st == nil {
		return ErrNoSigningKeys
	}
	s.signing.lastRead = time.Now()
	keys, err := st.SigningKeys(ctx)
	if err != nil {
		return fmt.Errorf("reading signing keys: %w", err)
	}
	set, err := newSigningSet(keys)
	if err != nil {
		return err
	}
	if prev := s.signing.set.Swap(set); prev == nil || !slices.EqualFunc(prev.keys, set.keys, sameID) {
		ids := make([]string, len(keys))
		for i := range keys {
			ids[i] = keys[i].ID
		}
		s.logger.Info("signing keys of minted tokens", zap.Strings("kids", ids))
	}
	return nil
}

func sameID(a, b store.SigningKey) bool { return a.ID == b.ID }

// firstSigningKey makes the store's first signing key, unless another
// instance just did; two made at once both verify, and the newer signs.
func (s *Service) firstSigningKey(ctx context.Context, now time.Time) (*signingSet, error) {
	s.signing.mu.Lock()
	defer s.signing.mu.Unlock()
	if err := s.readSigningKeysLocked(ctx); err != nil {
		return nil, err
	}
	if set := s.signing.set.Load(); len(set.keys) > 0 {
		return set, nil
	}
	k, err := store.NewSigningKey(now)
	if err != nil {
		return nil, err
	}
	if err := s.Store().AddSigningKey(ctx, k); err != nil {
		return nil, fmt.Errorf("storing a signing key: %w", err)
	}
	if err := s.readSigningKeysLocked(ctx); err != nil {
		return nil, err
	}
	set := s.signing.set.Load()
	if len(set.keys) == 0 {
		return nil, errors.New("the signing key just stored is not in the store")
	}
	return set, nil
}

// keepSigningKeys reads the signing keys again, once minting or
// verifying began, so that a rotation elsewhere reaches this instance.
// It skips a turn while a refresh holds them, rather than keep the loop
// from syncing the keys.
func (s *Service) keepSigningKeys(ctx context.Context) {
	if !s.signing.mu.TryLock() {
		return
	}
	defer s.signing.mu.Unlock()
	if !s.signing.used || time.Since(s.signing.lastRead) < signingPoll {
		return
	}
	if err := s.readSigningKeysLocked(ctx); err != nil {
		s.logTransition(&s.signingFailing, err, "reading the signing keys of minted tokens")
		return
	}
	s.logTransition(&s.signingFailing, nil, "reading the signing keys of minted tokens")
}

// newSigningSet builds the set of keys, oldest first.
func newSigningSet(keys []store.SigningKey) (*signingSet, error) {
	set := &signingSet{keys: keys, byKID: make(map[string]*signingEntry, len(keys))}
	type jwk struct {
		Kty string `json:"kty"`
		Crv string `json:"crv"`
		X   string `json:"x"`
		Kid string `json:"kid"`
		Alg string `json:"alg"`
		Use string `json:"use"`
	}
	pub := struct {
		Keys []jwk `json:"keys"`
	}{Keys: []jwk{}}
	for i := range keys {
		k := &keys[i]
		pk, ok := k.Private.Public().(ed25519.PublicKey)
		if !ok {
			return nil, fmt.Errorf("signing key %s is not an Ed25519 key", k.ID)
		}
		e := &signingEntry{key: token.VerificationKey{Key: pk, Alg: "EdDSA"}}
		if r := Retired(keys, i); !r.IsZero() {
			e.retired = r.UnixMilli()
		}
		set.byKID[k.ID] = e
		pub.Keys = append(pub.Keys, jwk{Kty: "OKP", Crv: "Ed25519", X: base64.RawURLEncoding.EncodeToString(pk), Kid: k.ID, Alg: "EdDSA", Use: "sig"})
	}
	var err error
	set.jwks, err = json.Marshal(pub)
	return set, err
}

// ParseMintedClaims reads what a verified minted token says of its user:
// its subject, tier, the key that minted it and the models it narrows
// to. ok is false for claims of the wrong shape.
func ParseMintedClaims(claims map[string]any) (user, tier, keyID string, models []string, ok bool) {
	user, _ = claims["sub"].(string)
	tier, _ = claims["tier"].(string)
	keyID, _ = claims["key_id"].(string)
	if user == "" || tier == "" || keyID == "" {
		return "", "", "", nil, false
	}
	switch list := claims["models"].(type) {
	case nil:
	case []any:
		if len(list) == 0 {
			return "", "", "", nil, false
		}
		models = make([]string, 0, len(list))
		for _, m := range list {
			s, isString := m.(string)
			if !isString || s == "" {
				return "", "", "", nil, false
			}
			models = append(models, s)
		}
	default:
		return "", "", "", nil, false
	}
	return user, tier, keyID, models, true
}
