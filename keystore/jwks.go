package keystore

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"go.uber.org/zap"
)

// Bounds of what an OpenID provider's key set costs to fetch and hold.
const (
	fetchTimeout      = 10 * time.Second
	maxFetchedBytes   = 1 << 20 // a discovery document or a key set
	maxPublishedKeys  = 100
	minRSABits        = 2048
	minRefreshSpacing = 10 * time.Second // between fetches asked for by unknown kids
	defaultKeysTTL    = 15 * time.Minute // when the provider sets no max-age
	minKeysTTL        = time.Minute
	maxKeysTTL        = 24 * time.Hour
	maxRetryWait      = 5 * time.Minute
)

// VerificationKey is a public key an issuer signs tokens with.
type VerificationKey struct {
	Key any    // *rsa.PublicKey, *ecdsa.PublicKey (P-256 or P-384) or ed25519.PublicKey
	Alg string // the only algorithm it may verify, when its publisher named one
}

// fits reports whether the key may verify a signature of alg: its type
// must be the algorithm's, so that no key serves another algorithm.
func (k *VerificationKey) fits(alg string) bool {
	if k.Alg != "" && k.Alg != alg {
		return false
	}
	switch key := k.Key.(type) {
	case *rsa.PublicKey:
		return strings.HasPrefix(alg, "RS") || strings.HasPrefix(alg, "PS")
	case *ecdsa.PublicKey:
		return alg == "ES256" && key.Curve == elliptic.P256() || alg == "ES384" && key.Curve == elliptic.P384()
	case ed25519.PublicKey:
		return alg == "EdDSA"
	}
	return false
}

// equal reports whether o is the same key for the same algorithm.
func (k *VerificationKey) equal(o *VerificationKey) bool {
	pub, ok := k.Key.(interface{ Equal(crypto any) bool })
	return ok && k.Alg == o.Alg && pub.Equal(o.Key)
}

// keySet is one fetched set of keys; never changed once published.
type keySet struct {
	byKID map[string]*VerificationKey
	only  *VerificationKey // the set's one key, for tokens without kid; nil unless there is one
}

// kids are the key IDs of the set, sorted.
func (s *keySet) kids() []string {
	return slices.Sorted(maps.Keys(s.byKID))
}

func sameKIDs(a, b *keySet) bool {
	return slices.Equal(a.kids(), b.kids())
}

func (s *keySet) key(kid string) *VerificationKey {
	if kid == "" {
		return s.only
	}
	return s.byKID[kid]
}

// RemoteKeys are the signing keys an OpenID provider publishes, fetched
// from its JWKS, which its discovery document names unless configured.
// Start fetches them in the background and again when their cache
// lifetime ends; a token naming an unknown kid asks for them again, at
// most once every 10 seconds. Keys stay in use while the provider cannot
// be reached. Safe for concurrent use; make one with NewRemoteKeys.
type RemoteKeys struct {
	issuer    string
	jwksURL   string // "" to discover it
	client    *http.Client
	transport *http.Transport // the client's, whose connections Stop closes
	logger    *zap.Logger
	minTTL    time.Duration   // the shortest a fetched set is kept: minKeysTTL, shorter in tests
	ctx       context.Context // ends with Stop
	stop      context.CancelFunc
	start     sync.Once

	keys atomic.Pointer[keySet] // nil until the first fetch succeeds

	// OnFetchError, when set before Start, is called after each fetch that
	// failed, for metrics.
	OnFetchError func(error)

	mu          sync.Mutex // protects following fields
	lastAttempt time.Time
	running     *fetch // nil when no fetch runs
}

// fetch is one run of fetching the keys, shared by whoever waits for it.
type fetch struct {
	done chan struct{} // closed when ttl and err are set
	ttl  time.Duration
	err  error
}

// NewRemoteKeys returns the key set of issuer, fetched from jwksURL or,
// when it is empty, from the jwks_uri of the issuer's discovery document.
// Nothing is fetched before Start or Refresh.
func NewRemoteKeys(issuer, jwksURL string, logger *zap.Logger) *RemoteKeys {
	ctx, stop := context.WithCancel(context.Background())
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxResponseHeaderBytes = 64 << 10
	return &RemoteKeys{
		issuer:    issuer,
		jwksURL:   jwksURL,
		client:    fetchClient(transport),
		transport: transport,
		logger:    logger.With(zap.String("issuer", issuer)),
		minTTL:    minKeysTTL,
		ctx:       ctx,
		stop:      stop,
	}
}

// fetchClient follows a few redirects, each to a URL a provider may use.
func fetchClient(transport *http.Transport) *http.Client {
	return &http.Client{
		Transport: transport,
		Timeout:   fetchTimeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 3 {
				return errors.New("more than 3 redirects")
			}
			return CheckProviderURL(req.URL.String())
		},
	}
}

// CheckProviderURL refuses a URL of a provider's that is not https, but
// for http on a loopback host (a provider on the same machine).
func CheckProviderURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	if u.Host == "" || u.User != nil {
		return fmt.Errorf("'%s' is not an absolute URL with a host and no user info", raw)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if host := u.Hostname(); host == "localhost" || net.ParseIP(host).IsLoopback() {
			return nil
		}
	}
	return fmt.Errorf("'%s' is not https (http is allowed only on a loopback host)", raw)
}

// Start fetches the keys in the background until Stop, keeping them
// fresh; calling it again does nothing.
func (k *RemoteKeys) Start() {
	k.start.Do(func() { go k.keepFresh() })
}

// Stop ends the background fetching and closes its connections.
func (k *RemoteKeys) Stop() {
	k.stop()
	k.transport.CloseIdleConnections()
}

// Destruct stops the key set when the last config using it goes.
func (k *RemoteKeys) Destruct() error {
	k.Stop()
	return nil
}

// Key returns the published key of kid, or nil: for a token without kid
// the set's key when it has exactly one. It does not allocate.
func (k *RemoteKeys) Key(kid string) *VerificationKey {
	s := k.keys.Load()
	if s == nil {
		return nil
	}
	return s.key(kid)
}

// Refresh fetches the keys again, for a token whose kid is unknown, and
// waits for them (or for ctx); unless a fetch began within the last 10
// seconds, when it returns at once, so that made-up kids cost the
// provider little. One fetch serves every caller that waits.
func (k *RemoteKeys) Refresh(ctx context.Context) {
	f := k.begin(time.Now(), minRefreshSpacing)
	if f == nil {
		return
	}
	select {
	case <-f.done:
	case <-ctx.Done():
	}
}

// begin returns the running fetch, or starts one unless the last began
// within spacing; nil when none runs.
func (k *RemoteKeys) begin(now time.Time, spacing time.Duration) *fetch {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.running != nil {
		return k.running
	}
	if now.Sub(k.lastAttempt) < spacing {
		return nil
	}
	k.lastAttempt = now
	f := &fetch{done: make(chan struct{})}
	k.running = f
	go func() {
		f.ttl, f.err = k.fetch()
		if f.err != nil && k.ctx.Err() == nil && k.OnFetchError != nil {
			k.OnFetchError(f.err)
		}
		k.mu.Lock()
		k.running = nil
		k.mu.Unlock()
		close(f.done)
	}()
	return f
}

// keepFresh fetches the keys, then again when their lifetime ends; after
// a failure it retries sooner, backing off up to 5 minutes.
func (k *RemoteKeys) keepFresh() {
	retry := time.Second
	for {
		f := k.begin(time.Now(), 0)
		var wait time.Duration
		select {
		case <-f.done:
		case <-k.ctx.Done():
			return
		}
		switch {
		case f.err == nil:
			wait, retry = f.ttl, time.Second
		case k.ctx.Err() != nil:
			return
		default:
			k.logger.Warn("fetching the signing keys of an OpenID provider; its tokens are checked with the keys fetched before, if any",
				zap.Error(f.err), zap.Duration("retry_in", retry))
			wait, retry = retry, min(2*retry, maxRetryWait)
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-k.ctx.Done():
			t.Stop()
			return
		}
	}
}

// fetch gets the key set and publishes it, returning how long it may be
// kept. A failure keeps the keys fetched before.
func (k *RemoteKeys) fetch() (time.Duration, error) {
	ctx, cancel := context.WithTimeout(k.ctx, fetchTimeout)
	defer cancel()
	jwksURL := k.jwksURL
	if jwksURL == "" {
		var err error
		if jwksURL, err = k.discover(ctx); err != nil {
			return 0, err
		}
	}
	body, header, err := k.get(ctx, jwksURL)
	if err != nil {
		return 0, err
	}
	set, skipped, err := parseKeySet(body, k.keys.Load())
	if err != nil {
		return 0, fmt.Errorf("key set %s: %w", jwksURL, err)
	}
	if prev := k.keys.Swap(set); prev == nil || !sameKIDs(prev, set) {
		k.logger.Info("fetched the signing keys of an OpenID provider",
			zap.Strings("kids", set.kids()), zap.Int("skipped", skipped))
	}
	return keysTTL(header.Get("Cache-Control"), k.minTTL), nil
}

// discover reads jwks_uri from the issuer's discovery document, whose
// issuer must be this one (OpenID Connect Discovery 1.0, section 4.3).
func (k *RemoteKeys) discover(ctx context.Context) (string, error) {
	docURL := strings.TrimSuffix(k.issuer, "/") + "/.well-known/openid-configuration"
	body, _, err := k.get(ctx, docURL)
	if err != nil {
		return "", err
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return "", fmt.Errorf("discovery document %s: %w", docURL, err)
	}
	if doc.Issuer != k.issuer {
		return "", fmt.Errorf("discovery document %s names the issuer '%s', not '%s'", docURL, doc.Issuer, k.issuer)
	}
	if err := CheckProviderURL(doc.JWKSURI); err != nil {
		return "", fmt.Errorf("discovery document %s: jwks_uri: %w", docURL, err)
	}
	return doc.JWKSURI, nil
}

// get reads a provider's document of at most maxFetchedBytes.
func (k *RemoteKeys) get(ctx context.Context, u string) ([]byte, http.Header, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Accept", "application/json")
	res, err := k.client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("GET %s: status %d", u, res.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(res.Body, maxFetchedBytes+1))
	if err != nil {
		return nil, nil, fmt.Errorf("GET %s: %w", u, err)
	}
	if len(body) > maxFetchedBytes {
		return nil, nil, fmt.Errorf("GET %s: larger than %d bytes", u, maxFetchedBytes)
	}
	return body, res.Header, nil
}

// parseKeySet reads a JWKS, keeping the public signature keys fit for an
// allowed algorithm and skipping the others (encryption keys, symmetric
// keys, small RSA keys, unknown types), so that one odd key does not cost
// the whole set. A key unchanged since prev keeps its identity, which
// remembered tokens are checked against.
func parseKeySet(body []byte, prev *keySet) (*keySet, int, error) {
	var raw struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(body, &raw); err != nil {
		return nil, 0, err
	}
	set := &keySet{byKID: make(map[string]*VerificationKey)}
	skipped := 0
	var all []*VerificationKey
	if len(raw.Keys) > maxPublishedKeys {
		skipped = len(raw.Keys) - maxPublishedKeys
		raw.Keys = raw.Keys[:maxPublishedKeys]
	}
	for _, r := range raw.Keys {
		key, kid, ok := parseKey(r)
		if !ok || set.byKID[kid] != nil {
			skipped++
			continue
		}
		if prev != nil {
			if old := prev.byKID[kid]; old != nil && old.equal(key) {
				key = old
			}
		}
		all = append(all, key)
		if kid != "" {
			set.byKID[kid] = key
		}
	}
	if len(all) == 0 {
		return nil, skipped, errors.New("no key fit to verify tokens")
	}
	if len(all) == 1 {
		set.only = all[0]
	}
	return set, skipped, nil
}

// parseKey reads one JWK; false for a key that cannot verify tokens.
func parseKey(raw json.RawMessage) (*VerificationKey, string, bool) {
	var jwk jose.JSONWebKey
	if err := jwk.UnmarshalJSON(raw); err != nil || jwk.Use != "" && jwk.Use != "sig" {
		return nil, "", false
	}
	if jwk.Algorithm != "" && !allowedAlg(jwk.Algorithm) {
		return nil, "", false
	}
	pub := jwk.Public() // a provider that published a private key still means its public half
	key := &VerificationKey{Key: pub.Key, Alg: jwk.Algorithm}
	switch k := pub.Key.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() < minRSABits {
			return nil, "", false
		}
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return nil, "", false
		}
	case ed25519.PublicKey:
	default:
		return nil, "", false
	}
	return key, jwk.KeyID, true
}

// keysTTL is how long a key set may be kept, from its Cache-Control
// max-age within floor (1 minute) and 1 day; 15 minutes without one.
func keysTTL(cacheControl string, floor time.Duration) time.Duration {
	for directive := range strings.SplitSeq(cacheControl, ",") {
		name, value, _ := strings.Cut(strings.TrimSpace(directive), "=")
		switch strings.ToLower(name) {
		case "no-store", "no-cache":
			return floor
		case "max-age":
			secs, err := strconv.ParseInt(strings.Trim(value, `"`), 10, 64)
			if err != nil || secs < 0 {
				return defaultKeysTTL
			}
			return min(max(time.Duration(min(secs, int64(maxKeysTTL/time.Second)))*time.Second, floor), maxKeysTTL)
		}
	}
	return defaultKeysTTL
}
