// Command standin serves the stand-in for the Vigthoria API that the
// tests, the demo and the benchmarks use, on a port of its own, so that a
// Caddyfile of your own can be tried without an account: point its
// upstream at the URL this prints, and its api_key at the key.
//
//	go run ./internal/cmd/standin [-port 9090] [-key demo-server-key]
//
// It answers chat completions (streamed too), completions, embeddings
// and the models list, with usage, pausing between a stream's events as
// a real model does. Ctrl-C stops it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

func main() {
	port := flag.String("port", envOr("STANDIN_PORT", "9090"), "port on localhost")
	key := flag.String("key", envOr("VIGTHORIA_API_KEY", "standin-server-key"), "the server key it accepts")
	delay := flag.Duration("delay", 25*time.Millisecond, "pause between a stream's events")
	flag.Parse()
	if err := run(*port, *key, *delay); err != nil {
		fmt.Fprintln(os.Stderr, "standin:", err)
		os.Exit(1)
	}
}

func run(port, key string, delay time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		return fmt.Errorf("port %s is taken or refused: choose another with -port: %w", port, err)
	}
	api := standin.New(standin.Options{APIKey: key})
	api.SetBehavior(standin.Behavior{ChunkDelay: delay})
	srv := &http.Server{Handler: api, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	fmt.Printf("A stand-in for the Vigthoria API is at http://%s/v1, accepting the server key %s.\n"+
		"In your Caddyfile's vigthoria block:\n\n\tupstream http://%s/v1\n\tapi_key {env.VIGTHORIA_API_KEY}\n\n"+
		"with VIGTHORIA_API_KEY=%s in Caddy's environment. Ctrl-C stops it.\n", ln.Addr(), key, ln.Addr(), key)
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(shutdown); err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		return nil
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
