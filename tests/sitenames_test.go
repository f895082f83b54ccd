package tests

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// siteNamesWarning is what the log says when callers identified by what
// browsers send by themselves reach a site that answers every Host.
const siteNamesWarning = "are served on a site without host names"

// TestAmbientCallersOnASiteWithoutNames: anonymous callers on a site that
// answers every Host, where a page of any name that DNS points at the
// server is same-site to the browser (DNS rebinding), make the proxy warn
// once, naming the fix; on a site with its names, Caddy refuses such a
// Host itself, and nothing is said.
func TestAmbientCallersOnASiteWithoutNames(t *testing.T) {
	for _, anyHost := range []bool{true, false} {
		up := standin.New(standin.Options{APIKey: serverKey})
		srv := httptest.NewServer(up)
		t.Cleanup(srv.Close)
		e := newEnv(t, up, srv)
		block := vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}",
			"store "+strings.Replace(e.store, ":", " ", 1), "tier free", "anonymous free")
		var opts []harness.Option
		if anyHost {
			opts = append(opts, harness.AnyHost())
		}
		e.caddy = harness.StartCaddy(t, block, opts...)
		for range 2 {
			res := e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": nil})
			res.Body.Close()
			if res.StatusCode != http.StatusOK {
				t.Fatalf("an anonymous caller: status %d, want 200", res.StatusCode)
			}
		}
		// A key's caller is never the warning's occasion; the log is read
		// after it, so that the warning had its chance.
		res := e.do(t, http.MethodGet, "/v1/usage", nil, nil)
		res.Body.Close()
		warned := e.caddy.WaitLog(t, siteNamesWarning)
		if warned != anyHost {
			t.Errorf("site answering any Host %v: warned %v, want %v", anyHost, warned, anyHost)
		}
		if n := strings.Count(e.caddy.ReadLog(t), siteNamesWarning); anyHost && n != 1 {
			t.Errorf("warned %d times, want once", n)
		}
	}
}
