package vigthoria

import (
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
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
