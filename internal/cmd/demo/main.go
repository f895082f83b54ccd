// Command demo runs the proxy with nothing from outside: a local stand-in
// for the Vigthoria API, a key store in a temporary directory with a demo
// client key and an app backend's key that may mint tokens, and ./caddy
// in front of it all. The same Caddy serves the browser demo, a chat page
// on an origin of its own that calls the API across origins with the
// demo key or as a signed-in user, with a token from the app backend this
// program runs beside the page. It prints how to call the proxy and stops
// everything on Ctrl-C.
package main

import (
	"context"
	"crypto/rand"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/demo"
	"github.com/vigthoria/caddy-vigthoria/internal/freeport"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
	"golang.org/x/crypto/bcrypt"
)

//go:embed demo.Caddyfile
var demoCaddyfile []byte

func main() {
	caddyBin := flag.String("caddy", "./caddy", "Caddy binary built with this module")
	port := flag.String("port", envOr("PORT", "8080"), "port of the proxy on localhost")
	pagePort := flag.String("page-port", envOr("PAGE_PORT", "8081"), "port of the demo chat page on localhost")
	dashboardPort := flag.String("dashboard-port", envOr("DASHBOARD_PORT", "8082"), "port of the operators' dashboard on localhost")
	flag.Parse()
	if err := run(*caddyBin, ports{*port, *pagePort, *dashboardPort}); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// ports are the demo's ports on localhost.
type ports struct{ proxy, page, dashboard string }

// check says which port is taken, and how to choose another.
func (p ports) check() error {
	for _, c := range []struct{ port, env, what string }{
		{p.proxy, "PORT", "the proxy"}, {p.page, "PAGE_PORT", "the demo page"}, {p.dashboard, "DASHBOARD_PORT", "the dashboard"},
	} {
		l, err := net.Listen("tcp", "127.0.0.1:"+c.port)
		if err != nil {
			return fmt.Errorf("port %s, for %s, is taken: choose another with %s, e.g. make run %s=%d", c.port, c.what, c.env, c.env, another(c.port))
		}
		l.Close()
	}
	return nil
}

// another suggests a port instead of taken: a thousand above it.
func another(taken string) int {
	n, err := strconv.Atoi(taken)
	if err != nil || n > 64535 {
		return 9080
	}
	return n + 1000
}

func run(caddyBin string, p ports) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := p.check(); err != nil {
		return err
	}
	port, pagePort := p.proxy, p.page

	dir, err := os.MkdirTemp("", "vigthoria-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	config := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(config, demoCaddyfile, 0o600); err != nil {
		return err
	}
	db := filepath.Join(dir, "vigthoria.db")
	clientKey, mintKey, err := demoKeys(ctx, db)
	if err != nil {
		return fmt.Errorf("creating the demo's keys: %w", err)
	}
	proxyURL := "http://localhost:" + port
	pageURL := "http://localhost:" + pagePort
	pageDir := filepath.Join(dir, "page")
	// Answers of 48 tokens, so that the page's answers stream visibly
	// without taking long (the free tier's cap would make them 256).
	if err := demo.Write(pageDir, demo.Config{APIBase: proxyURL, Key: clientKey, SignIn: true, MaxTokens: 48}); err != nil {
		return fmt.Errorf("writing the demo page: %w", err)
	}
	admin, err := freeport.Take()
	if err != nil {
		return err
	}
	adminPort := strconv.Itoa(admin)
	// The dashboard's password, new each run, printed below.
	password := rand.Text()[:16]
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return err
	}

	// The stand-in's key plays the server key: random, so that nothing
	// printed here works against anything but this demo.
	serverKey := "demo-server-" + rand.Text()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("starting the stand-in upstream: %w", err)
	}
	// A pause between the events of a stream, as a real model has, so
	// that answers visibly stream in the page and with curl -N.
	api := standin.New(standin.Options{APIKey: serverKey})
	api.SetBehavior(standin.Behavior{ChunkDelay: 25 * time.Millisecond})
	upstream := &http.Server{Handler: api, ReadHeaderTimeout: 10 * time.Second}
	go upstream.Serve(ln)
	defer upstream.Close()
	upstreamURL := "http://" + ln.Addr().String() + "/v1"

	// The app's backend, behind the page's site: it signs users in and
	// mints their tokens with its key, which never reaches the page.
	// Tokens of two minutes, so that the page is seen renewing them.
	backendLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("starting the app backend: %w", err)
	}
	backend := &http.Server{
		Handler:           demo.Backend(demo.BackendConfig{APIBase: proxyURL, MintKey: mintKey, Tier: "free", TTL: 2 * time.Minute}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go backend.Serve(backendLn)
	defer backend.Close()
	_, backendPort, _ := net.SplitHostPort(backendLn.Addr().String())

	cmd := exec.Command(caddyBin, "run", "--config", config, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(),
		"VIGTHORIA_API_KEY="+serverKey,
		"VIGTHORIA_UPSTREAM="+upstreamURL,
		"VIGTHORIA_DB="+db,
		"PORT="+port,
		"PAGE_PORT="+pagePort,
		"DEMO_PAGE_DIR="+pageDir,
		"BACKEND_PORT="+backendPort,
		"ADMIN_PORT="+adminPort,
		"DASHBOARD_PORT="+p.dashboard,
		"DASHBOARD_HASH="+string(hash),
	)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", caddyBin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	if err := waitReady(ctx, proxyURL+"/v1/usage", exited); err != nil {
		_ = cmd.Process.Signal(os.Interrupt)
		return err
	}
	fmt.Printf(`
The proxy is running at %[1]s, in front of a local stand-in for the
Vigthoria API at %[2]s. The demo client key of tier "free" is
%[3]s

The demo chat page is at %[6]s: open it in a browser. It calls the
proxy from that other origin (the proxy's cors setting allows it) with
the demo key, streams the answers, shows the limits left, and has
buttons to ask for a model outside the tier and to use up its requests.
Its "Signed-in user" mode signs you in by name with the app's backend
beside the page (POST %[6]s/api/token), which holds a key of
tier "pro" that may mint tokens of tier "free": the page gets a token
of two minutes for you, calls with it instead of a key, and renews it
before it expires.

Try:

  curl -s %[1]s/v1/chat/completions -H 'Authorization: Bearer %[3]s' \
    -H 'Content-Type: application/json' \
    -d '{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"Hello"}]}'

  curl -sN %[1]s/v1/chat/completions -H 'Authorization: Bearer %[3]s' \
    -H 'Content-Type: application/json' \
    -d '{"model":"vigthoria-fast-1","stream":true,"messages":[{"role":"user","content":"Hello"}]}'

  curl -s %[1]s/v1/models -H 'Authorization: Bearer %[3]s'

Sign alice in with the app's backend, then call with the token it gives:

  curl -s %[6]s/api/token -H 'Content-Type: application/json' -d '{"user":"alice"}'
  curl -s %[1]s/v1/usage -H 'Authorization: Bearer <that token>'

The operators' dashboard is at %[7]s: user operator, password %[8]s

More keys: %[4]s vigthoria key add --tier pro --name you --store sqlite:%[5]s
Ports: PORT=%[9]s, PAGE_PORT=%[10]s, DASHBOARD_PORT=%[11]s (set them to choose others).
Ctrl-C stops everything and deletes the demo's keys.
`, proxyURL, upstreamURL, clientKey, caddyBin, db, pageURL, "http://localhost:"+p.dashboard, password, port, pagePort, p.dashboard)

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

// demoKeys creates the demo's client key and the app backend's minting
// key in a new store at path.
func demoKeys(ctx context.Context, path string) (client, mint string, err error) {
	st, err := sqlite.Open(path)
	if err != nil {
		return "", "", err
	}
	defer st.Close()
	now := time.Now()
	if _, client, err = keys.Create(ctx, st, keys.Attrs{Name: "demo", Tier: "free"}, now); err != nil {
		return "", "", err
	}
	_, mint, err = keys.Create(ctx, st, keys.Attrs{Name: "backend", Tier: "pro", Mint: []string{"free"}}, now)
	return client, mint, err
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
