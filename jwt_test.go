package vigthoria

import (
	"strings"
	"testing"
)

// TestJWTCaller checks how a verified token's claims name its caller and
// tier, and which claims refuse it.
func TestJWTCaller(t *testing.T) {
	tiers := map[string]*Tier{"free": {}, "plus": {}}
	withTier := &JWTIssuer{UserClaim: "sub", TierClaim: "plan", Tier: "free", host: "auth.example.com"}
	claimOnly := &JWTIssuer{UserClaim: "email", TierClaim: "plan", host: "auth.example.com"}
	longest := strings.Repeat("u", maxIdentityLen-len("jwt:auth.example.com:"))
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
		{"another user claim", claimOnly, map[string]any{"sub": "x", "email": "a@example.com", "plan": "plus"}, "jwt:auth.example.com:a@example.com", "plus"},
		{"no tier at all", claimOnly, map[string]any{"email": "a@example.com", "plan": "gold"}, "", ""},
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
