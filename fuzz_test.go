package vigthoria

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"vigthoria {\n upstream http://x/v1\n api_key {env.K}\n}",
		"vigthoria {\n tier free {\n requests 60/1m burst 10\n quota 5/day\n models a-* b\n }\n}",
		"vigthoria {\n retries 2 max_wait 1s\n models_cache off\n cors https://a.example\n}",
		"vigthoria x", "vigthoria {\n tier\n}", "vigthoria {\n auth_failures 1/0s\n}",
		"vigthoria {\n jwt https://a.example/ {\n audience x y\n tier_claim plan\n leeway 10s\n }\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		d := caddyfile.NewTestDispenser(input)
		h := new(Handler)
		if err := h.UnmarshalCaddyfile(d); err != nil {
			return
		}
		for name, tier := range h.Tiers {
			if tier == nil {
				t.Errorf("tier %q parsed to nil", name)
			}
		}
		for _, j := range h.JWT {
			if j == nil || len(j.Audience) == 0 {
				t.Errorf("jwt issuer parsed to %+v, without an audience", j)
			}
		}
	})
}

// FuzzTokenRequest checks that what a key asks to mint, however it is
// spelled, is minted only within what the key may: one of its tiers, a
// user that prints as itself, a ttl within max_token_ttl and models that
// are names or globs. And that the claims of what is minted read back
// the same.
func FuzzTokenRequest(f *testing.F) {
	for _, s := range []string{
		`{"user":"u_123","tier":"free","ttl":"15m","models":["vigthoria-fast-*"]}`,
		`{"user":"u"}`, `{"user":"u","tier":"pro"}`, `{"user":"u","ttl":"-1s"}`, `{"user":"u","ttl":"2h"}`,
		`{"user":"a\u202eb"}`, `{"user":"u","models":[]}`, `{"user":"u","models":["a[b"]}`,
		`{"user":"u","user":"v"}`, `{"user":"u"} {}`, `[]`, `null`, `{"USER":"u"}`,
	} {
		f.Add(s)
	}
	h := &Handler{MaxTokenTTL: caddy.Duration(time.Hour), Tiers: map[string]*policy.Tier{"free": {}, "basic": {}, "pro": {}},
		bodyLimits: proxy.BodyLimits{MaxBuffered: 1 << 20}}
	mint := []string{"free", "basic", "gold"}
	read := func(body string) (tokenRequest, *api.Error) {
		x := exchange{h: h, w: httptest.NewRecorder(), r: httptest.NewRequest(http.MethodPost, "/vigthoria/tokens", strings.NewReader(body))}
		return x.readTokenRequest(proxy.Holder{})
	}
	if req, apiErr := read(`{"user":"u","tier":"free"}`); apiErr != nil || req.User != "u" {
		f.Fatalf("a good token request reads as %+v, %v", req, apiErr)
	}
	f.Fuzz(func(t *testing.T, body string) {
		req, apiErr := read(body)
		if apiErr != nil {
			return
		}
		tr, apiErr := (&exchange{h: h}).checkTokenRequest(req, mint)
		if apiErr != nil {
			if apiErr.Status != http.StatusBadRequest && apiErr.Status != http.StatusForbidden {
				t.Errorf("refused with %d, want 400 or 403", apiErr.Status)
			}
			return
		}
		switch {
		case !slices.Contains(mint, tr.Tier) || h.Tiers[tr.Tier] == nil:
			t.Errorf("minted tier %q, not one the key may mint and the proxy has", tr.Tier)
		case !validMintUser(tr.User):
			t.Errorf("minted for user %q", tr.User)
		case tr.TTL < time.Second || tr.TTL > time.Hour:
			t.Errorf("minted for %v", tr.TTL)
		case tr.Models != nil && (len(tr.Models) == 0 || len(tr.Models) > maxMintModels):
			t.Errorf("minted with %d models", len(tr.Models))
		}
		for _, m := range tr.Models {
			if !policy.ValidGlob(m) {
				t.Errorf("minted with model glob %q", m)
			}
		}
		// What the token's claims say reads back as asked.
		claims, _ := json.Marshal(map[string]any{"sub": tr.User, "tier": tr.Tier, "key_id": "key_x", "models": tr.Models})
		var m map[string]any
		if err := json.Unmarshal(claims, &m); err != nil {
			t.Fatal(err)
		}
		user, tier, keyID, models, ok := keys.ParseMintedClaims(m)
		if !ok || user != tr.User || tier != tr.Tier || keyID != "key_x" || !slices.Equal(models, tr.Models) {
			t.Errorf("claims of %+v read back as %q %q %q %v %v", tr, user, tier, keyID, models, ok)
		}
	})
}
