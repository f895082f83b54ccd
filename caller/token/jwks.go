package token

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
	fetchTimeout     = 10 * time.Second
	maxFetchedBytes  = 1 << 20 // a discovery document or a key set
	maxPublishedKeys = 100
	minRSABits       = 2048
	minFetchSpacing  = time.Second      // between the beginnings of two fetches
	defaultKeysTTL   = 15 * time.Minute // when the provider sets no max-age
	minKeysTTL       = time.Minute
	maxKeysTTL       = 24 * time.Hour
	maxRetryWait     = 5 * time.Minute
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
// lifetime ends; a token naming an unknown kid waits for a fetch that
// begins after it came (see Refresh). Fetches never overlap and begin at
// most once a second. Keys stay in use while the provider cannot be
// reached. Safe for concurrent use; make one with NewRemoteKeys.
type RemoteKeys struct {
	issuer    string
	jwksURL   string // "" to discover it
	client    *http.Client
	transport *http.Transport // the client's, whose connections Stop closes
	logger    *zap.Logger
	minTTL    time.Duration    // the shortest a fetched set is kept: minKeysTTL, shorter in tests
	spacing   time.Duration    // the least time between the beginnings of two fetches: minFetchSpacing
	now       func() time.Time // the clock: time.Now, or a test's
	ctx       context.Context  // ends with Stop
	stop      context.CancelFunc
	start     sync.Once

	keys atomic.Pointer[keySet] // nil until the first fetch succeeds

	// OnFetchError, when set before Start, is called after each fetch that
	// failed, for metrics.
	OnFetchError func(error)

	mu        sync.Mutex // protects following fields
	lastBegan time.Time  // when the last fetch began
	running   *fetch     // the fetch under way; nil when none runs
	ended     *fetch     // the last fetch that ended; nil before
	next      *fetch     // asked for, to begin once running ends and spacing allows; nil when none is
}

// fetch is one run of fetching the keys, shared by whoever waits for it.
type fetch struct {
	done  chan struct{} // closed when ttl and err are set
	began time.Time     // set under RemoteKeys.mu when it begins
	ttl   time.Duration
	err   error
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
		spacing:   minFetchSpacing,
		now:       time.Now,
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

// Refresh waits for the keys the provider published by the time it is
// called, for a token naming kid, which the keys fetched so far lack (or
// without kid, whose signature the set's one key refused): for the fetch
// under way, which may hold it (the first fetch, at start-up), and unless
// it does, for a fetch that begins after the call, so that a key
// published before the token came is always found. However many tokens
// ask, fetches never overlap and begin at most once a second: the next
// one answers every token that came while the one before ran, and
// made-up kids cost the provider one fetch a second at most. It returns
// an error when that fetch failed, or ctx ended first; nil when it
// looked, whether or not the provider publishes kid.
func (k *RemoteKeys) Refresh(ctx context.Context, kid string) error {
	asked := k.now()
	k.mu.Lock()
	f := k.running
	k.mu.Unlock()
	// Without kid, the one key is known whether or not it is the latest:
	// only a fetch begun since can tell.
	if f != nil && kid != "" && await(ctx, f) == nil && k.Key(kid) != nil {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return await(ctx, k.since(asked))
}

// await waits for f, or for ctx; its error is f's, or ctx's.
func await(ctx context.Context, f *fetch) error {
	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// since returns a fetch that began at or after t: the one under way or
// the last one if it did, else the next, which it asks for.
func (k *RemoteKeys) since(t time.Time) *fetch {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, f := range [...]*fetch{k.running, k.ended} {
		if f != nil && !f.began.Before(t) {
			return f
		}
	}
	if k.next == nil {
		k.next = &fetch{done: make(chan struct{})}
		if k.running == nil {
			go k.run() // else the running one's run begins it
		}
	}
	return k.next
}

// run begins the next fetch once spacing has passed since the last one
// began, and then each asked for while one ran, until none is; one run
// goes at a time.
func (k *RemoteKeys) run() {
	for {
		k.mu.Lock()
		wait := k.lastBegan.Add(k.spacing).Sub(k.now())
		k.mu.Unlock()
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-k.ctx.Done(): // the fetch then fails at once
				t.Stop()
			}
		}
		k.mu.Lock()
		f := k.next
		k.next, k.running = nil, f
		f.began = k.now()
		k.lastBegan = f.began
		k.mu.Unlock()

		f.ttl, f.err = k.fetch()
		if f.err != nil && k.ctx.Err() == nil && k.OnFetchError != nil {
			k.OnFetchError(f.err)
		}

		k.mu.Lock()
		k.running, k.ended = nil, f
		more := k.next != nil
		k.mu.Unlock()
		close(f.done)
		if !more {
			return
		}
	}
}

// keepFresh fetches the keys, then again when their lifetime ends; after
// a failure it retries sooner, backing off up to 5 minutes.
func (k *RemoteKeys) keepFresh() {
	retry := time.Second
	for {
		f := k.since(k.now())
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
