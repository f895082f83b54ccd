package vigthoria

import (
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/token"
	"github.com/vigthoria/caddy-vigthoria/policy"
)

// Defaults of a jwt issuer.
const (
	DefaultJWTLeeway    = 30 * time.Second
	DefaultJWTUserClaim = "sub"
	maxJWTLeeway        = 5 * time.Minute
	// rememberedTokens bounds the verified tokens kept, about 300 bytes each.
	rememberedTokens = 1 << 16
)

// jwtPrefix starts the IDs of callers signed in with an OpenID provider.
const jwtPrefix = "jwt:"

// remoteKeys holds the OpenID providers' key sets, which outlive a config
// reload that keeps the issuer and its jwks_url.
var remoteKeys = caddy.NewUsagePool()

// JWTIssuer lets the users of an OpenID identity provider call with the
// tokens it gives them, such as Auth0, Keycloak, Cognito or Firebase
// tokens. A token is accepted when it is signed (RS256/384/512,
// PS256/384/512, ES256/384 or EdDSA) by a key the provider publishes, and
// its iss, aud, exp, nbf and iat hold. Its caller is
// jwt:<issuer host>:<user claim>, with limits and usage of its own.
type JWTIssuer struct {
	// The issuer, exactly as its tokens' iss claim names it, such as
	// https://tenant.auth0.com/ (with its trailing slash, if it has one).
	// https, or http on a loopback host. Required.
	Issuer string `json:"issuer"`

	// The audiences accepted: a token's aud must hold one of them,
	// exactly, such as the API identifier or client ID of your app.
	// Required, so that the provider's tokens for other apps are refused.
	Audience []string `json:"audience"`

	// Where the provider publishes its signing keys (a JWKS). Default:
	// the jwks_uri of <issuer>/.well-known/openid-configuration.
	JWKSURL string `json:"jwks_url,omitempty"`

	// The claim naming the user: a non-empty string of printable
	// characters (no control or format characters). Only sub is unique
	// and stable per issuer; any other claim draws a warning when the
	// config loads. With email or phone_number, a token is accepted only
	// when the provider says it verified the value: email_verified
	// (phone_number_verified) is true, or the string "true". Default: sub.
	UserClaim string `json:"user_claim,omitempty"`

	// A claim whose string value is the user's tier when it names a
	// configured tier, such as a plan the provider adds to its tokens.
	// Default: none.
	TierClaim string `json:"tier_claim,omitempty"`

	// The tier of users whose tier_claim names no configured tier.
	// Required without tier_claim; without it a token whose tier_claim
	// names no configured tier is refused.
	Tier string `json:"tier,omitempty"`

	// The clock skew allowed when checking exp, nbf and iat, at most 5m.
	// Default: 30s.
	Leeway caddy.Duration `json:"leeway,omitempty"`

	host    string // of the issuer URL, in caller IDs
	poolKey string // of its keys in remoteKeys
	keys    *token.RemoteKeys
}

// provision sets the issuer's defaults and loads its key set, which is
// fetched only once the config starts.
func (j *JWTIssuer) provision(logger *zap.Logger) error {
	if j.UserClaim == "" {
		j.UserClaim = DefaultJWTUserClaim
	}
	if j.Leeway == 0 {
		j.Leeway = caddy.Duration(DefaultJWTLeeway)
	}
	if j.UserClaim != "sub" {
		msg := "jwt user_claim is not sub: only sub is unique and stable per issuer; other claims may be changed, reused or set by the user, and two accounts that give the same value are one caller, with one caller's limits and usage"
		if v := verifiedClaim(j.UserClaim); v != "" {
			msg += "; tokens are accepted only when " + v + " is true"
		}
		logger.Warn(msg, zap.String("issuer", j.Issuer), zap.String("user_claim", j.UserClaim))
	}
	u, err := url.Parse(j.Issuer)
	if err != nil {
		return fmt.Errorf("jwt issuer '%s': %v", j.Issuer, err)
	}
	j.host = strings.ToLower(u.Host)
	j.poolKey = j.Issuer + " " + j.JWKSURL
	keys, _, err := remoteKeys.LoadOrNew(j.poolKey, func() (caddy.Destructor, error) {
		keys := token.NewRemoteKeys(j.Issuer, j.JWKSURL, logger)
		failures := metrics.keyFetchErrors.WithLabelValues(j.Issuer)
		keys.OnFetchError = func(error) { failures.Inc() }
		return keys, nil
	})
	if err != nil {
		return err
	}
	j.keys = keys.(*token.RemoteKeys)
	return nil
}

// validate checks the issuer against the configured tiers.
func (j *JWTIssuer) validate(tiers map[string]*policy.Tier) error {
	if err := token.CheckProviderURL(j.Issuer); err != nil {
		return fmt.Errorf("jwt issuer: %v", err)
	}
	if strings.ContainsAny(j.Issuer, "?#") {
		return fmt.Errorf("jwt issuer '%s': an issuer has no query or fragment", j.Issuer)
	}
	if j.JWKSURL != "" {
		if err := token.CheckProviderURL(j.JWKSURL); err != nil {
			return fmt.Errorf("jwt %s: jwks_url: %v", j.Issuer, err)
		}
	}
	if len(j.Audience) == 0 || slices.Contains(j.Audience, "") {
		return fmt.Errorf("jwt %s: audience is required, so that the provider's tokens for other apps are refused", j.Issuer)
	}
	if j.Tier == "" && j.TierClaim == "" {
		return fmt.Errorf("jwt %s: needs a tier, a tier_claim, or both", j.Issuer)
	}
	if j.Tier != "" && tiers[j.Tier] == nil {
		return fmt.Errorf("jwt %s: tier '%s' is not configured", j.Issuer, j.Tier)
	}
	if j.Leeway < 0 || time.Duration(j.Leeway) > maxJWTLeeway {
		return fmt.Errorf("jwt %s: leeway must be between 0 and %s", j.Issuer, maxJWTLeeway)
	}
	return nil
}

// validateJWTIssuers checks each issuer, and that no two share a host,
// whose users' caller IDs could then be the same.
func validateJWTIssuers(issuers []*JWTIssuer, tiers map[string]*policy.Tier) error {
	hosts := make(map[string]string)
	for _, j := range issuers {
		if j == nil {
			return errors.New("jwt: null issuer")
		}
		if err := j.validate(tiers); err != nil {
			return err
		}
		name := hostName(j.host)
		if other, dup := hosts[name]; dup {
			return fmt.Errorf("jwt issuers '%s' and '%s' share the host %s: their users would share caller IDs jwt:<host>:<user>", other, j.Issuer, name)
		}
		hosts[name] = j.Issuer
	}
	return nil
}

// hostName is a host without its port.
func hostName(host string) string {
	u := url.URL{Host: host}
	return u.Hostname()
}

// tokenIssuer is the issuer as the token verifier needs it.
func (j *JWTIssuer) tokenIssuer(tiers map[string]*policy.Tier) *token.Issuer {
	return &token.Issuer{
		Issuer:   j.Issuer,
		Audience: j.Audience,
		Leeway:   time.Duration(j.Leeway),
		Keys:     j.keys,
		Caller:   func(claims map[string]any) (caller.Client, bool) { return j.caller(claims, tiers) },
	}
}

// caller names the user of a verified token's claims and its tier.
func (j *JWTIssuer) caller(claims map[string]any, tiers map[string]*policy.Tier) (caller.Client, bool) {
	user, ok := claims[j.UserClaim].(string)
	if !ok || user == "" || strings.ContainsFunc(user, notPrintable) {
		return caller.Client{}, false
	}
	if v := verifiedClaim(j.UserClaim); v != "" && !claimTrue(claims[v]) {
		return caller.Client{}, false // anyone may put anyone's address on an account
	}
	id := jwtPrefix + j.host + ":" + user
	if len(id) > caller.MaxIDLen {
		return caller.Client{}, false // never cut: two users would share one ID
	}
	tier := j.Tier
	if j.TierClaim != "" {
		if named, _ := claims[j.TierClaim].(string); tiers[named] != nil {
			tier = named
		}
	}
	if tier == "" {
		return caller.Client{}, false
	}
	return caller.Client{ID: id, Name: user, Tier: tier}, true
}

// verifiedClaim names the claim by which an OpenID provider says it
// verified the value of a user claim that users enter themselves
// (OpenID Connect Core, 5.1): "" for other claims.
func verifiedClaim(userClaim string) string {
	switch userClaim {
	case "email", "phone_number":
		return userClaim + "_verified"
	}
	return ""
}

// claimTrue reports whether a verification claim says true: the JSON
// boolean, as the standard has it, or exactly the string "true", as Sign
// in with Apple and some Cognito tokens send it. Nothing else ("True",
// "1", 1, a missing claim) is taken for true.
func claimTrue(v any) bool {
	return v == true || v == "true"
}

// notPrintable reports a character that does not print as itself:
// control and format characters (bidirectional overrides, zero widths)
// would let a user's name forge or hide text where it is shown.
func notPrintable(r rune) bool { return !unicode.IsGraphic(r) }

// provisionJWT loads the jwt issuers and the verifier of their tokens
// and of the tokens the proxy mints.
func (h *Handler) provisionJWT(logger *zap.Logger) error {
	issuers := make([]*token.Issuer, 0, len(h.JWT)+1)
	issuers = append(issuers, mintedUsers{keys: h.keys, tiers: h.Tiers, maxTTL: time.Duration(h.MaxTokenTTL)}.issuer())
	for _, j := range h.JWT {
		if j == nil {
			return errors.New("jwt: null issuer")
		}
		if err := j.provision(logger); err != nil {
			return err
		}
		issuers = append(issuers, j.tokenIssuer(h.Tiers))
	}
	var err error
	h.tokens, err = token.NewVerifier(issuers, rememberedTokens)
	if err != nil {
		return fmt.Errorf("jwt: %w", err)
	}
	return nil
}

// startJWT fetches the issuers' keys in the background: Caddy starts
// while a provider is down, and its tokens are accepted once it answers.
func (h *Handler) startJWT() {
	for _, j := range h.JWT {
		j.keys.Start()
	}
}

// cleanupJWT releases the issuers' key sets.
func (h *Handler) cleanupJWT() error {
	var errs []error
	for _, j := range h.JWT {
		if j != nil && j.keys != nil {
			_, err := remoteKeys.Delete(j.poolKey)
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
