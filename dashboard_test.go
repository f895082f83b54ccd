package vigthoria

import "testing"

// TestDashboardCaller checks the tier the dashboard charts a caller
// without a key under, and that a minted token's user is counted in its
// minting key's rows only.
func TestDashboardCaller(t *testing.T) {
	h := &Handler{
		Anonymous:    "free",
		identityTier: "team",
		JWT: []*JWTIssuer{
			{Tier: "pro", host: "id.example:8443"},
			{Tier: "free", TierClaim: "plan", host: "claims.example"},
		},
	}
	p := handlerPolicy{h}
	for _, c := range []struct {
		client, tier string
		counted      bool
	}{
		{"mint:key_abc:ann", "", true},
		{"jwt:id.example:8443:bob", "pro", false},
		{"jwt:id.example:bob", "", false},     // another issuer's host
		{"jwt:claims.example:eve", "", false}, // each token may name its tier
		{"user:carol", "team", false},
		{"ip:192.0.2.0/24", "free", false},
		{"someone", "", false},
	} {
		tier, counted := p.Caller(c.client)
		if tier != c.tier || counted != c.counted {
			t.Errorf("Caller(%q) = %q, %v; want %q, %v", c.client, tier, counted, c.tier, c.counted)
		}
	}
}
