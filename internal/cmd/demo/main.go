// Command demo runs the proxy with nothing from outside: a local stand-in
// for the Vigthoria API, and ./caddy in front of it with the given
// Caddyfile. It prints how to call the proxy and stops both on Ctrl-C.
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

func main() {
	caddyBin := flag.String("caddy", "./caddy", "Caddy binary built with this module")
	config := flag.String("config", "Caddyfile.example", "Caddyfile of the proxy")
	port := flag.String("port", envOr("PORT", "8080"), "port of the proxy on localhost")
	flag.Parse()
	if err := run(*caddyBin, *config, *port); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(caddyBin, config, port string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// The stand-in's key plays the server key: random, so that nothing
	// printed here works against anything but this demo.
	serverKey := "demo-server-" + rand.Text()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("starting the stand-in upstream: %w", err)
	}
	upstream := &http.Server{Handler: standin.New(standin.Options{APIKey: serverKey}), ReadHeaderTimeout: 10 * time.Second}
	go upstream.Serve(ln)
	defer upstream.Close()
	upstreamURL := "http://" + ln.Addr().String() + "/v1"

	cmd := exec.Command(caddyBin, "run", "--config", config, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(),
		"VIGTHORIA_API_KEY="+serverKey,
		"VIGTHORIA_UPSTREAM="+upstreamURL,
		"PORT="+port,
	)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", caddyBin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	proxyURL := "http://localhost:" + port
	if err := waitReady(ctx, proxyURL+"/v1/models", exited); err != nil {
		_ = cmd.Process.Signal(os.Interrupt)
		return err
	}
	fmt.Printf(`
The proxy is running at %[1]s, in front of a local stand-in for the
Vigthoria API at %[2]s. Try:

  curl -s %[1]s/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"Hello"}]}'

  curl -sN %[1]s/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model":"vigthoria-fast-1","stream":true,"messages":[{"role":"user","content":"Hello"}]}'

  curl -s %[1]s/v1/models

Ctrl-C stops both.
`, proxyURL, upstreamURL)

	select {
	case err := <-exited:
		return fmt.Errorf("caddy exited: %v", err)
	case <-ctx.Done():
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
		return nil
	}
}

// waitReady polls url until the proxy answers, Caddy exits or 30s pass.
func waitReady(ctx context.Context, url string, exited <-chan error) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if res, err := http.Get(url); err == nil {
			res.Body.Close()
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("caddy exited before it was ready: %v", err)
		case <-ctx.Done():
			return errors.New("interrupted")
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("the proxy did not answer at %s within 30s", url)
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
