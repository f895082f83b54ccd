// Package tests drives a real Caddy, loaded in this process from a
// Caddyfile, with the official openai-go client, against the stand-in
// upstream.
package tests

import (
	"encoding/pem"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

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
	return m.Run()
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
