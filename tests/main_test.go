// Package tests drives a real Caddy, loaded in this process from a
// Caddyfile, with the official openai-go client, against the stand-in
// upstream.
package tests

import (
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
)

func TestMain(m *testing.M) {
	harness.RunAsCaddy()
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "vigthoria-tests-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := trustTestCert(filepath.Join(dir, "ca.pem")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	http.DefaultClient.Transport = redial{http.DefaultTransport}
	if code := m.Run(); code != 0 {
		return code
	}
	// Every test stopped its Caddy, stand-ins and clients: nothing of
	// theirs may still run.
	http.DefaultClient.CloseIdleConnections()
	// go-redis redials a Redis it failed to reach once a second until its
	// pool is closed: a closed pool's last redial ends within the second.
	time.Sleep(1100 * time.Millisecond)
	if err := goleak.Find(
		// Caddy's, for the life of the process: the admin endpoint, which
		// caddy.Stop leaves running, and the rotation goroutine of each log
		// file writer, which nothing stops.
		goleak.IgnoreAnyFunction("github.com/caddyserver/caddy/v2.replaceLocalAdminServer.func2"),
		goleak.IgnoreTopFunction("github.com/DeRuina/timberjack.(*Logger).millRun"),
		// certmagic's, ending by itself within 5s of its lock's release.
		goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
	); err != nil {
		fmt.Fprintln(os.Stderr, "goroutines leaked:", err)
		return 1
	}
	return 0
}

// trustTestCert makes https stand-ins trusted by this process, as a real
// upstream's certificate is: every httptest TLS server presents the same
// certificate, and SSL_CERT_FILE is read when the system roots are first
// needed, so it is set before any test runs.
func trustTestCert(path string) error {
	srv := httptest.NewTLSServer(nil)
	cert := srv.TLS.Certificates[0].Certificate[0]
	srv.Close()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert}), 0o600); err != nil {
		return err
	}
	return os.Setenv("SSL_CERT_FILE", path)
}

// redial retries a request whose connection was refused or reset while it
// was being made, as the official API clients do. On Linux, Caddy gives
// each config its own SO_REUSEPORT socket, and a connection still queued
// on the old one when a reload closes it is reset by the kernel before
// any handler saw it, so a retry counts nothing twice. Failures of a
// connection that was made still reach the test.
type redial struct{ next http.RoundTripper }

func (r redial) RoundTrip(req *http.Request) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		res, err := r.next.RoundTrip(req)
		var op *net.OpError
		if err == nil || attempt == 3 || !errors.As(err, &op) || op.Op != "dial" || req.Context().Err() != nil {
			return res, err
		}
		if req.Body != nil && req.Body != http.NoBody {
			if req.GetBody == nil {
				return res, err
			}
			body, err := req.GetBody()
			if err != nil {
				return nil, err
			}
			req = req.Clone(req.Context())
			req.Body = body
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach the
// transport below.
func (r redial) CloseIdleConnections() {
	if c, ok := r.next.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}
