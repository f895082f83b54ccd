package vigthoria

import (
	"encoding/json"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/admission"
	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/caller/token"
	"github.com/vigthoria/caddy-vigthoria/internal/strictjson"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// Minted tokens: an app's backend exchanges its client key for a
// short-lived token per signed-in user (POST /vigthoria/tokens), which
// the page sends in place of a key.
const (
	// DefaultMaxTokenTTL is the longest life of a minted token by default.
	DefaultMaxTokenTTL = time.Hour
	// defaultTokenTTL is a token's life when the request names none.
	defaultTokenTTL = 15 * time.Minute
	// mintPrefix starts the caller IDs of minted tokens' users:
	// mint:<minting key ID>:<user>.
	mintPrefix = "mint:"
	// Bounds of what a token request may hold.
	maxMintBody = 16 << 10
	// maxMintUser is the most bytes of a token's user: the longest whose
	// caller ID, mint:<key ID>:<user>, is within caller.MaxIDLen, so that
	// a token minted is a token that works.
	maxMintUser   = caller.MaxIDLen - len(mintPrefix) - keys.IDLen - len(":")
	maxMintModels = 16
)

// Paths of the proxy's own, beside the API's endpoints.
const (
	tokensPath = "/vigthoria/tokens"
	jwksPath   = "/vigthoria/jwks.json"
)

var errMintNotAllowed = &api.Error{
	Status:  http.StatusForbidden,
	Type:    "permission_error",
	Code:    "mint_not_allowed",
	Message: "This key may not mint tokens. Create a key that may, with: caddy vigthoria key add --mint <tiers> …",
}

func errMintRequest(msg string) *api.Error {
	return &api.Error{Status: http.StatusBadRequest, Type: api.TypeInvalidRequest, Code: "invalid_token_request", Message: msg}
}

func errTierNotMintable(tier string) *api.Error {
	return &api.Error{
		Status:  http.StatusForbidden,
		Type:    "permission_error",
		Code:    "tier_not_mintable",
		Message: "This key may not mint tokens of tier " + strconv.Quote(api.Clip(tier, 64)) + ".",
	}
}

// tokenRequest is the body of POST /vigthoria/tokens.
type tokenRequest struct {
	User   string   `json:"user"`
	Tier   string   `json:"tier"`
	TTL    string   `json:"ttl"`
	Models []string `json:"models"`
}

// tokenAnswer is its answer.
type tokenAnswer struct {
	Token     string   `json:"token"`
	ExpiresAt int64    `json:"expires_at"` // unix seconds
	User      string   `json:"user"`
	Tier      string   `json:"tier"`
	Models    []string `json:"models,omitempty"`
}

// serveOwn answers the proxy's own paths under /vigthoria/.
func (x *exchange) serveOwn(p string) error {
	h, r := x.h, x.r
	if err := h.start(); err != nil {
		h.logger.Error("the key store is unavailable", zap.Error(err))
		x.endpoint = "tokens"
		return x.refuse(admission.ErrUnavailable)
	}
	switch p {
	case tokensPath:
		x.endpoint = "tokens"
		if r.Method != http.MethodPost {
			return x.refuse(api.MethodNotAllowed(r.Method, p, http.MethodPost))
		}
		if !jsonContentType(r.Header) {
			return x.refuse(errUnsupportedMediaType)
		}
		return x.serveTokens()
	case jwksPath:
		x.endpoint = "jwks"
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			return x.refuse(api.MethodNotAllowed(r.Method, p, http.MethodGet))
		}
		return x.serveJWKS()
	}
	return x.refuse(api.NotFound(r.Method, p))
}

// serveTokens mints a token for a user of the app whose key calls: only
// a client key (never a token) with the right to mint, only tiers it may
// mint, and a minting counts as one request of the key's request limit.
func (x *exchange) serveTokens() error {
	h, w, r, now := x.h, x.w, x.r, x.now
	if keyInQuery(r.URL.RawQuery) {
		return x.refuse(errKeyInQuery)
	}
	secret, ok := clientkey.FromAuthorization(r.Header["Authorization"])
	var client caller.Client
	if ok {
		client, ok = h.keys.Identify(secret, now)
	}
	if !ok {
		return x.refuse(h.refuseAuth(x.clientAddr(), now, true))
	}
	keyTier, mint, may := h.keys.Minter(client.ID, now)
	tier := h.policy.TierFor(keyTier, client.Settings)
	x.client, x.tier = client, client.Tier
	switch {
	case !may:
		x.tier = h.tierLabel(client.Tier)
		return x.refuseClient(errMintNotAllowed)
	case tier == nil:
		x.tier = h.tierLabel(keyTier)
		return x.refuseClient(errTierNotConfigured)
	case !tier.AllowsOrigin(r.Header.Get("Origin")):
		x.tier = keyTier
		return x.refuseClient(errKeyOriginNotAllowed)
	}
	a, f := h.admitter.Admit(r.Context(), client, tier, policy.MintLimits, now)
	if f != nil {
		return x.refuseDecided(f)
	}
	h.admitter.Settle(r.Context(), &a, ledger.Tokens{})

	req, apiErr := x.readTokenRequest(proxy.Holder{Share: tier.Bodies(), Caller: client.ID})
	if apiErr != nil {
		return x.refuseClient(apiErr)
	}
	tr, apiErr := x.checkTokenRequest(req, mint)
	if apiErr != nil {
		return x.refuseClient(apiErr)
	}
	tr.KeyID = client.ID
	token, expires, err := h.keys.Mint(r.Context(), tr, now)
	if err != nil {
		h.logger.Error("minting a token", zap.String("client_id", client.ID), zap.Error(err))
		return x.refuseClient(admission.ErrUnavailable)
	}
	requestsBy.get([3]string{client.Tier, "tokens", "ok"}).Inc()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusCreated)
	return json.NewEncoder(w).Encode(tokenAnswer{
		Token: token, ExpiresAt: expires.Unix(), User: tr.User, Tier: tr.Tier, Models: tr.Models,
	})
}

// readTokenRequest reads the body of a token request: one JSON object
// of known fields, within the handler's body timeout and a small size,
// counted against who.
func (x *exchange) readTokenRequest(who proxy.Holder) (tokenRequest, *api.Error) {
	h, w, r := x.h, x.w, x.r
	var req tokenRequest
	lim := h.bodyLimits
	lim.Size = maxMintBody
	body, apiErr := proxy.ReadBody(w, r, &lim, who)
	if apiErr != nil {
		return req, apiErr
	}
	defer body.Release()
	if err := strictjson.Unmarshal(body.Bytes(), &req); err != nil {
		return req, errMintRequest(`Send a JSON object: {"user": "…", "tier": "…", "ttl": "15m", "models": ["…"]}; only user is required (` + api.Clip(err.Error(), 200) + `).`)
	}
	return req, nil
}

// checkTokenRequest checks what a key asks to mint against what it may.
func (x *exchange) checkTokenRequest(req tokenRequest, mint []string) (keys.TokenRequest, *api.Error) {
	h := x.h
	tr := keys.TokenRequest{User: req.User, Tier: req.Tier, Models: req.Models, TTL: defaultTokenTTL}
	if !validMintUser(req.User) {
		return tr, errMintRequest("user must be 1 to " + strconv.Itoa(maxMintUser) + " bytes of printable UTF-8 naming the signed-in user, such as its ID.")
	}
	if tr.Tier == "" {
		if len(mint) != 1 {
			return tr, errMintRequest("Name the token's tier: this key may mint tokens of several (" + strings.Join(mint, ", ") + ").")
		}
		tr.Tier = mint[0]
	}
	if !slices.Contains(mint, tr.Tier) {
		return tr, errTierNotMintable(tr.Tier)
	}
	if h.Tiers[tr.Tier] == nil {
		return tr, errMintRequest("The tier " + strconv.Quote(tr.Tier) + " is not configured on this proxy.")
	}
	if req.TTL != "" {
		ttl, err := time.ParseDuration(req.TTL)
		if err != nil || ttl < time.Second || ttl > time.Duration(h.MaxTokenTTL) {
			return tr, errMintRequest("ttl must be a duration such as 15m, from 1s to " + time.Duration(h.MaxTokenTTL).String() + ".")
		}
		tr.TTL = ttl
	}
	if tr.Models != nil && len(tr.Models) == 0 {
		return tr, errMintRequest("models, when given, names at least one model or glob; leave it out for every model of the tier.")
	}
	if len(tr.Models) > maxMintModels {
		return tr, errMintRequest("models names at most " + strconv.Itoa(maxMintModels) + " models or globs.")
	}
	for _, m := range tr.Models {
		if !policy.ValidGlob(m) {
			return tr, errMintRequest("models holds " + strconv.Quote(api.Clip(m, 64)) + ", which is not a model name or glob such as vigthoria-fast-*.")
		}
	}
	return tr, nil
}

// validMintUser reports whether a token request's user is short and
// prints as itself: it is shown in usage and logs.
func validMintUser(user string) bool {
	return user != "" && len(user) <= maxMintUser && utf8.ValidString(user) &&
		!strings.ContainsFunc(user, notPrintable)
}

// serveJWKS publishes the public keys of minted tokens, for whoever wants
// to verify them, such as the app's own backend.
func (x *exchange) serveJWKS() error {
	w, r := x.w, x.r
	jwks, err := x.h.keys.JWKS(r.Context())
	if err != nil {
		x.h.logger.Error("reading the signing keys", zap.Error(err))
		return x.refuse(admission.ErrUnavailable)
	}
	w.Header().Set("Content-Type", "application/jwk-set+json")
	w.Header().Set("Cache-Control", "public, max-age=60")
	w.Header().Set("Content-Length", strconv.Itoa(len(jwks)))
	if r.Method == http.MethodHead {
		return nil
	}
	_, err = w.Write(jwks)
	return err
}

// mintedUsers are the users of the tokens minted by any instance sharing
// the store: signed by a signing key in the store, for a user of a key
// that is still live and may still mint the token's tier.
type mintedUsers struct {
	keys   *keys.Service
	tiers  map[string]*policy.Tier
	maxTTL time.Duration // max_token_ttl
}

// issuer verifies minted tokens.
func (u mintedUsers) issuer() *token.Issuer {
	return &token.Issuer{
		Issuer:   keys.MintIssuer,
		Audience: []string{keys.MintAudience},
		// The instances of a fleet may disagree on the time a token was
		// issued; its end is the expires_at its holder was told.
		Leeway:       DefaultJWTLeeway,
		StrictExpiry: true,
		Keys:         u.keys.MintKeys(u.maxTTL),
		Caller:       u.caller,
		Still:        u.still,
	}
}

// caller names the user of a verified minted token.
func (u mintedUsers) caller(claims map[string]any) (caller.Client, bool) {
	user, tier, keyID, models, ok := keys.ParseMintedClaims(claims)
	if !ok || !validMintUser(user) || u.tiers[tier] == nil || len(models) > maxMintModels {
		return caller.Client{}, false
	}
	for _, m := range models {
		if !policy.ValidGlob(m) {
			return caller.Client{}, false
		}
	}
	// A token lives at most max_token_ttl: no longer, even if a signing
	// key leaked.
	iat, _ := claims["iat"].(float64)
	exp, _ := claims["exp"].(float64)
	if iat <= 0 || exp-iat > math.Ceil(u.maxTTL.Seconds()) {
		return caller.Client{}, false
	}
	keyTier, mint, live := u.keys.Minter(keyID, time.Now())
	if !live || !slices.Contains(mint, tier) || u.tiers[keyTier] == nil {
		return caller.Client{}, false
	}
	id := mintPrefix + keyID + ":" + user
	if len(id) > caller.MaxIDLen {
		return caller.Client{}, false
	}
	return caller.Client{ID: id, Name: user, Tier: tier,
		Minted: &caller.Minted{KeyID: keyID, KeyTier: keyTier, Models: models, ModelsKey: proxy.FilterKey(models)}}, true
}

// still reports whether the key that minted a remembered token is still
// live and may still mint its tier: revoking it ends its tokens at once.
func (u mintedUsers) still(c caller.Client, now time.Time) bool {
	_, mint, live := u.keys.Minter(c.Minted.KeyID, now)
	return live && slices.Contains(mint, c.Tier)
}
