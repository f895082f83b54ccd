package vigthoria

import (
	"strings"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestJWTCaller checks how a verified token's claims name its caller and
// tier, and which claims refuse it.
func TestJWTCaller(t *testing.T) {
	tiers := map[string]*policy.Tier{"free": {}, "plus": {}}
	withTier := &JWTIssuer{UserClaim: "sub", TierClaim: "plan", Tier: "free", host: "auth.example.com"}
	claimOnly := &JWTIssuer{UserClaim: "email", TierClaim: "plan", host: "auth.example.com"}
	byPhone := &JWTIssuer{UserClaim: "phone_number", Tier: "free", host: "auth.example.com"}
	byName := &JWTIssuer{UserClaim: "preferred_username", Tier: "free", host: "auth.example.com"}
	longest := strings.Repeat("u", caller.MaxIDLen-len("jwt:auth.example.com:"))
	for _, tc := range []struct {
		name     string
		issuer   *JWTIssuer
		claims   map[string]any
		id, tier string // "" for refused
	}{
		{"default tier", withTier, map[string]any{"sub": "alice"}, "jwt:auth.example.com:alice", "free"},
		{"tier from the claim", withTier, map[string]any{"sub": "alice", "plan": "plus"}, "jwt:auth.example.com:alice", "plus"},
		{"unconfigured tier claim", withTier, map[string]any{"sub": "alice", "plan": "gold"}, "jwt:auth.example.com:alice", "free"},
		{"tier claim not a string", withTier, map[string]any{"sub": "alice", "plan": []any{"plus"}}, "jwt:auth.example.com:alice", "free"},
		{"a verified email", claimOnly, map[string]any{"sub": "x", "email": "a@example.com", "email_verified": true, "plan": "plus"}, "jwt:auth.example.com:a@example.com", "plus"},
		{`email_verified "true"`, claimOnly, map[string]any{"email": "a@example.com", "email_verified": "true", "plan": "plus"}, "jwt:auth.example.com:a@example.com", "plus"},
		{"email_verified false", claimOnly, map[string]any{"email": "a@example.com", "email_verified": false, "plan": "plus"}, "", ""},
		{"email_verified missing", claimOnly, map[string]any{"email": "a@example.com", "plan": "plus"}, "", ""},
		{`email_verified "True"`, claimOnly, map[string]any{"email": "a@example.com", "email_verified": "True", "plan": "plus"}, "", ""},
		{`email_verified "false"`, claimOnly, map[string]any{"email": "a@example.com", "email_verified": "false", "plan": "plus"}, "", ""},
		{"email_verified 1", claimOnly, map[string]any{"email": "a@example.com", "email_verified": 1.0, "plan": "plus"}, "", ""},
		{"email_verified in a list", claimOnly, map[string]any{"email": "a@example.com", "email_verified": []any{true}, "plan": "plus"}, "", ""},
		{"another claim verified", claimOnly, map[string]any{"email": "a@example.com", "phone_number_verified": true, "plan": "plus"}, "", ""},
		{"a verified phone number", byPhone, map[string]any{"phone_number": "+15550100", "phone_number_verified": true}, "jwt:auth.example.com:+15550100", "free"},
		{"an unverified phone number", byPhone, map[string]any{"phone_number": "+15550100", "email_verified": true}, "", ""},
		{"sub needs no verification", withTier, map[string]any{"sub": "alice", "email_verified": false}, "jwt:auth.example.com:alice", "free"},
		{"a custom claim needs none", byName, map[string]any{"preferred_username": "alice"}, "jwt:auth.example.com:alice", "free"},
		{"no tier at all", claimOnly, map[string]any{"email": "a@example.com", "email_verified": true, "plan": "gold"}, "", ""},
		{"longest user", withTier, map[string]any{"sub": longest}, "jwt:auth.example.com:" + longest, "free"},
		{"user one too long", withTier, map[string]any{"sub": longest + "u"}, "", ""},
		{"no user", withTier, map[string]any{"plan": "plus"}, "", ""},
		{"empty user", withTier, map[string]any{"sub": ""}, "", ""},
		{"numeric user", withTier, map[string]any{"sub": 42.0}, "", ""},
		{"control character", withTier, map[string]any{"sub": "alice\nkey_FAKE"}, "", ""},
		{"bidirectional override", withTier, map[string]any{"sub": "alice\u202egnp"}, "", ""},
		{"zero width", withTier, map[string]any{"sub": "ali\u200bce"}, "", ""},
	} {
		c, ok := tc.issuer.caller(tc.claims, tiers)
		if ok != (tc.id != "") || c.ID != tc.id || c.Tier != tc.tier {
			t.Errorf("%s: got %q of tier %q (ok %v), want %q of tier %q", tc.name, c.ID, c.Tier, ok, tc.id, tc.tier)
		}
	}
}

// TestJWTUserClaimWarning: a user_claim other than sub is warned about
// when the config loads, saying why, and what email requires.
func TestJWTUserClaimWarning(t *testing.T) {
	for _, tc := range []struct {
		claim, want string // "" for no warning
	}{
		{"", ""},
		{"sub", ""},
		{"email", "only sub is unique and stable per issuer; other claims may be changed, reused or set by the user, and two accounts that give the same value are one caller, with one caller's limits and usage; tokens are accepted only when email_verified is true"},
		{"preferred_username", "only sub is unique and stable per issuer"},
	} {
		core, logs := observer.New(zap.WarnLevel)
		j := &JWTIssuer{Issuer: "https://auth.example.com/", UserClaim: tc.claim}
		if err := j.provision(zap.New(core)); err != nil {
			t.Fatal(err)
		}
		remoteKeys.Delete(j.poolKey)
		entries := logs.All()
		switch {
		case tc.want == "" && len(entries) != 0:
			t.Errorf("user_claim %q: warned %q, want no warning", tc.claim, entries[0].Message)
		case tc.want != "" && (len(entries) != 1 || !strings.Contains(entries[0].Message, tc.want)):
			t.Errorf("user_claim %q: warned %v, want one warning saying %q", tc.claim, entries, tc.want)
		case tc.want != "" && (entries[0].ContextMap()["user_claim"] != tc.claim || entries[0].ContextMap()["issuer"] != j.Issuer):
			t.Errorf("user_claim %q: the warning's fields are %v, want the issuer and the claim", tc.claim, entries[0].ContextMap())
		}
	}
}
