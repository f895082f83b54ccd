package tests

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// TestChosenAddressesAreWarnedAbout runs anonymous callers and bad keys
// through a proxy in front that appends the address it saw to the
// X-Forwarded-For each caller forged. Behind trusted_proxies without
// trusted_proxies_strict, Caddy takes the forged address, and the
// handler warns once that callers choose their address; with strict, or
// without trusted_proxies, the limits hold and nothing is warned.
func TestChosenAddressesAreWarnedAbout(t *testing.T) {
	const warning = "callers can choose their client address"
	for _, c := range []struct {
		name, global string
		chosen       bool // whether the callers' forged addresses count
	}{
		{"trusted_proxies without strict", "\tservers {\n\t\ttrusted_proxies static 127.0.0.1/32\n\t}", true},
		{"trusted_proxies_strict", "\tservers {\n\t\ttrusted_proxies static 127.0.0.1/32\n\t\ttrusted_proxies_strict\n\t}", false},
		{"no trusted_proxies", "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			up := standin.New(standin.Options{APIKey: serverKey})
			srv := httptest.NewServer(up)
			t.Cleanup(srv.Close)
			e := newEnv(t, up, srv)
			e.caddy = harness.StartCaddy(t, vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}",
				"store "+strings.Replace(e.store, ":", " ", 1), "tier free {\n\t\t\trequests 2/1h\n\t\t}", "tier pro",
				"anonymous free", "auth_failures 5/1h"), harness.Global(c.global))
			// Anonymous callers; the proxy in front appends the address
			// it saw.
			forged := func(i int) http.Header {
				return http.Header{"Authorization": nil, "X-Forwarded-For": {fmt.Sprintf("203.0.113.%d, 198.51.100.7", i)}}
			}
			admitted, throttled := 0, 0
			for i := range 6 {
				if e.do(t, http.MethodGet, "/v1/models", nil, forged(i)).StatusCode == http.StatusOK {
					admitted++
				}
			}
			for i := range 10 {
				h := forged(i)
				h.Set("Authorization", "Bearer vgt_not-a-key")
				if e.do(t, http.MethodGet, "/v1/models", nil, h).StatusCode == http.StatusTooManyRequests {
					throttled++
				}
			}
			t.Logf("anonymous requests admitted: %d of 6 (limit 2); bad keys throttled: %d of 10 (limit 5)", admitted, throttled)
			if c.chosen != (admitted == 6 && throttled == 0) || !c.chosen && (admitted != 2 || throttled != 5) {
				t.Errorf("admitted %d of 6, throttled %d of 10: want the forged addresses to count: %v", admitted, throttled, c.chosen)
			}
			log := e.caddy.ReadLog(t)
			if n := strings.Count(log, warning); n != map[bool]int{true: 1, false: 0}[c.chosen] {
				t.Errorf("the warning %q is logged %d times", warning, n)
			}
			if c.chosen && !strings.Contains(log, "the anonymous tier's limits, the failed-authentication throttle") {
				t.Error("the warning does not say what counts by address")
			}
		})
	}
}
