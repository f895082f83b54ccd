package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/template"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/store"
	_ "github.com/vigthoria/caddy-vigthoria/store/redis" // the backends the specs name
	_ "github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// A target is one way of serving the API, measured under every workload.
// Adding one, such as the module with another store, is one entry in
// targets.
type target struct {
	name  string // short, for tables and progress
	about string // one line for the report, Markdown
	// site is the text/template (of siteData) of the Caddyfile's site
	// block. Empty: the target is the upstream itself, without Caddy.
	site string
	// store is the module's key store spec (see store.ParseSpec), a
	// template of siteData too. The client keys are created in it before
	// Caddy starts. Empty: the target knows no client keys; requests
	// carry valid-looking keys that nobody checks.
	store string
	// bin is the Caddy binary that serves the target; empty: the one
	// being measured (-caddy).
	bin string
}

// Names of the targets the goals compare.
const (
	upstreamName = "upstream"
	caddyName    = "caddy"
	moduleName   = "vigthoria"
	redisName    = "vigthoria-redis"
	// upstreamFeaturesName is the module with the queue, upstream_limits
	// and a pool of three server keys, none of them saturated.
	upstreamFeaturesName = "vigthoria-queue"
	baselineName         = "vigthoria-baseline"
)

// targets are measured in this order in every round.
var targets = []target{
	{name: upstreamName, about: "the stand-in upstream alone, served by the harness process: the floor"},
	{name: caddyName, about: "plain Caddy: `reverse_proxy` with the server key set by `header_up`, what a user would do without this module", site: plainSite},
	{name: moduleName, about: "this module with its default store, SQLite (in a temporary directory)", site: moduleSite, store: "sqlite:{{.Dir}}/vigthoria.db"},
	{name: redisName, about: "this module with the Redis store: keys, limits and usage in a redis-server on loopback, as a fleet shares them", site: moduleSite, store: "{{.Redis}}"},
	{name: upstreamFeaturesName, about: "this module with SQLite as `" + moduleName + "`, and a `queue`, `upstream_limits` the load never reaches, and a pool of three server keys: what they cost unsaturated", site: upstreamFeaturesSite, store: "sqlite:{{.Dir}}/vigthoria.db"},
}

// upstreamFeaturesSite is moduleSite with a pool of three server keys, a
// queue and upstream_limits that the load never reaches.
var upstreamFeaturesSite = strings.Replace(moduleSite, "\t\tapi_key {env.VIGTHORIA_API_KEY}\n", `		api_keys {
			{env.VIGTHORIA_API_KEY}
			{env.VIGTHORIA_KEY_B}
			{env.VIGTHORIA_KEY_C} weight 2
		}
		queue 10s
		upstream_limits {
			requests 1000000000/1m
			concurrent 100000
		}
`, 1)

// baselineTarget is the module as another binary builds it, with the
// default store, beside moduleName: a change's cost is the difference of
// the two rows of one run, not of two runs on a machine that drifted.
func baselineTarget(bin string) target {
	return target{
		name:  baselineName,
		about: "the module as `-baseline` builds it (an earlier commit), with SQLite as `" + moduleName + "`: the same workloads in the same rounds, so that before and after a change come from one run",
		site:  moduleSite, store: "sqlite:{{.Dir}}/vigthoria.db", bin: bin,
	}
}

// siteData is what the Caddyfile templates are filled with.
type siteData struct {
	Port      int    // the site's port on 127.0.0.1
	AdminPort int    // the admin endpoint's port on 127.0.0.1 (pprof)
	Upstream  string // the stand-in's origin, http://127.0.0.1:PORT; its API is under /v1
	Dir       string // the target's own temporary directory
	Store     string // the store's arguments in the Caddyfile: "sqlite PATH" or "redis URL"
	Redis     string // the URL of the harness's redis-server, when a target's store names it
	Issuer    string // the stand-in OpenID provider's issuer URL
}

// globalOptions starts every Caddyfile: admin on loopback for pprof,
// nothing persisted, logs to a file.
const globalOptions = `{
	admin 127.0.0.1:{{.AdminPort}}
	persist_config off
	auto_https off
	storage file_system {{.Dir}}/storage
	log {
		output file {{.Dir}}/caddy.log
	}
}
`

// plainSite is plain Caddy in front of the upstream, as a user would put
// it without this module. The stand-in serves the API under /v1 as the
// real API does, so paths need no rewrite.
const plainSite = `
http://127.0.0.1:{{.Port}} {
	bind 127.0.0.1
	reverse_proxy {{.Upstream}} {
		header_up Authorization "Bearer {env.VIGTHORIA_API_KEY}"
	}
}
`

// moduleSite is this module with tiers that never refuse the load: the
// benchTier of the single-client workloads and of the users of the
// stand-in OpenID provider, and the mixTiers, each with a different set
// of limits to check (pro's include a budget in money, at the prices
// given, so that mix measures what costs and budgets add).
const moduleSite = `
http://127.0.0.1:{{.Port}} {
	bind 127.0.0.1
	vigthoria {
		upstream {{.Upstream}}/v1
		api_key {env.VIGTHORIA_API_KEY}
		store {{.Store}}
		tier bench {
			requests 1000000000/1m
			tokens 1000000000000/1m
		}
		tier free {
			requests 1000000000/1m
			tokens 1000000000000/1m
			concurrent 1000
			models vigthoria-fast-*
			max_tokens 256
		}
		tier pro {
			requests 1000000000/1m
			tokens 1000000000000/1m
			concurrent 1000
			quota 1000000000000/month
			budget 1000000/month
		}
		prices {
			vigthoria-fast-* input 0.10 output 0.40
		}
		tier team {
			requests 1000000000/1m burst 1000000
		}
		jwt {{.Issuer}} {
			audience bench
			tier bench
		}
	}
}
`

// The tiers of the client keys. moduleSite configures each.
const benchTier = "bench"

var mixTiers = []string{"free", "pro", "team"}

// signedIn names, among the bearer tokens of an instance, the stand-in
// OpenID provider's token of its user, in place of a client key.
const signedIn = "jwt"

// keysPerTier is how many client keys each tier of the mix has.
const keysPerTier = 4

// instance is a target running.
type instance struct {
	target
	url    string              // where the API is, without /v1
	keys   map[string][]string // bearer tokens by tier
	client *http.Client        // kept across measurements, with its connections
	caddy  *caddyProcess       // nil for the upstream
}

// upstream is the stand-in upstream, served in this process, with the
// stand-in OpenID provider of the signed-in users.
type upstream struct {
	*standin.Server
	url    string // http://127.0.0.1:PORT
	key    string // the server key
	srv    *http.Server
	issuer *issuer
}

func startUpstream() (*upstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the stand-in upstream: %w", err)
	}
	iss, err := startIssuer()
	if err != nil {
		ln.Close()
		return nil, err
	}
	key := "bench-server-" + rand.Text()
	up := &upstream{
		issuer: iss,
		// A budget the load never spends: the module rightly stops calling
		// an upstream that says its key is exhausted.
		Server: standin.New(standin.Options{APIKey: key, NoRecord: true, RateLimit: 1e12, Accounts: map[string][]string{key + "-b": nil, key + "-c": nil}}),
		url:    "http://" + ln.Addr().String(),
		key:    key,
	}
	up.srv = &http.Server{Handler: up.Server, ReadHeaderTimeout: 10 * time.Second}
	go up.srv.Serve(ln)
	return up, nil
}

// startUpstreamIn makes a temporary directory for a run's targets and
// starts the stand-in upstream, pacing streams by chunkDelay (only
// streams are paced).
func startUpstreamIn(dirPrefix string, chunkDelay time.Duration) (string, *upstream, error) {
	dir, err := os.MkdirTemp("", dirPrefix)
	if err != nil {
		return "", nil, err
	}
	up, err := startUpstream()
	if err != nil {
		os.RemoveAll(dir)
		return "", nil, err
	}
	up.SetBehavior(standin.Behavior{ChunkDelay: chunkDelay})
	return dir, up, nil
}

// closeAndRemove stops the upstream and removes the run's directory.
func (up *upstream) closeAndRemove(dir string) {
	up.srv.Close()
	up.issuer.srv.Close()
	os.RemoveAll(dir)
}

// startTargets starts every target; when one fails, it stops the others.
func startTargets(ctx context.Context, caddyBin, dir string, up *upstream, redisURL string) ([]*instance, error) {
	var insts []*instance
	for _, t := range targets {
		inst, err := start(ctx, t, caddyBin, dir, up, redisURL)
		if err != nil {
			stopAll(insts)
			return nil, fmt.Errorf("starting target %s: %w", t.name, err)
		}
		insts = append(insts, inst)
	}
	return insts, nil
}

func stopAll(insts []*instance) {
	for _, inst := range insts {
		if inst.caddy != nil {
			inst.caddy.stop()
		}
	}
}

// start runs target t: its client keys first, then its Caddy.
func start(ctx context.Context, t target, caddyBin, dir string, up *upstream, redisURL string) (*instance, error) {
	inst := &instance{target: t, client: newClient()}
	if t.site == "" {
		inst.url = up.url
		inst.keys = sameKey(up.key)
		inst.keys[signedIn] = []string{up.key}
		return inst, nil
	}
	data := siteData{Upstream: up.url, Dir: filepath.Join(dir, t.name), Redis: redisURL, Issuer: up.issuer.url}
	if err := os.Mkdir(data.Dir, 0o700); err != nil {
		return nil, err
	}
	var err error
	if data.Port, err = freePort(); err != nil {
		return nil, err
	}
	if data.AdminPort, err = freePort(); err != nil {
		return nil, err
	}
	if inst.keys, data.Store, err = clientKeys(ctx, t.store, data, eachKey); err != nil {
		return nil, err
	}
	inst.keys[signedIn] = []string{up.issuer.token}
	caddyfile, err := render(globalOptions+t.site, data)
	if err != nil {
		return nil, err
	}
	inst.url = fmt.Sprintf("http://127.0.0.1:%d", data.Port)
	env := []string{
		"VIGTHORIA_API_KEY=" + up.key,
		"VIGTHORIA_KEY_B=" + up.key + "-b",
		"VIGTHORIA_KEY_C=" + up.key + "-c",
		"XDG_DATA_HOME=" + filepath.Join(data.Dir, "data"),
		"XDG_CONFIG_HOME=" + filepath.Join(data.Dir, "config"),
	}
	if t.bin != "" {
		caddyBin = t.bin
	}
	if inst.caddy, err = startCaddy(caddyBin, data.Dir, caddyfile, env, data.AdminPort); err != nil {
		return nil, err
	}
	// The signed-in user's first request waits for the issuer's keys.
	for _, key := range []string{inst.keys[benchTier][0], up.issuer.token} {
		if err := inst.caddy.waitReady(ctx, inst.client, inst.url+"/v1/models", key); err != nil {
			inst.caddy.stop()
			return nil, err
		}
	}
	return inst, nil
}

// clientKeys creates the client keys of every tier in the store that the
// template spec names, and returns them with the store's Caddyfile form.
// Without a store, the keys are new secrets that no store holds. each
// names the keys to create, as eachKey does.
func clientKeys(ctx context.Context, spec string, data siteData, each func(f func(tier string, i int) error) error) (map[string][]string, string, error) {
	if spec == "" {
		keys, err := newSecrets()
		return keys, "", err
	}
	spec, err := render(spec, data)
	if err != nil {
		return nil, "", err
	}
	kind, where, err := store.ParseSpec(spec)
	if err != nil {
		return nil, "", err
	}
	svc, err := keys.NewService(spec, nil)
	if err != nil {
		return nil, "", err
	}
	if err := svc.Start(); err != nil {
		return nil, "", fmt.Errorf("opening the key store: %w", err)
	}
	secrets := make(map[string][]string)
	err = each(func(tier string, i int) error {
		_, secret, err := keys.Create(ctx, svc.Store(), keys.Attrs{Name: fmt.Sprintf("bench-%s-%d", tier, i), Tier: tier}, time.Now())
		secrets[tier] = append(secrets[tier], secret)
		return err
	})
	if stopErr := svc.Stop(); err == nil {
		err = stopErr
	}
	return secrets, kind + " " + where, err
}

// newSecrets returns well-formed client keys that no store knows.
func newSecrets() (map[string][]string, error) {
	keys := make(map[string][]string)
	err := eachKey(func(tier string, _ int) error {
		secret, err := clientkey.New()
		keys[tier] = append(keys[tier], secret)
		return err
	})
	return keys, err
}

// eachKey calls f for every client key the workloads use.
func eachKey(f func(tier string, i int) error) error {
	if err := f(benchTier, 0); err != nil {
		return err
	}
	for _, tier := range mixTiers {
		for i := range keysPerTier {
			if err := f(tier, i); err != nil {
				return err
			}
		}
	}
	return nil
}

// sameKey returns key as every client key: the upstream takes only its own.
func sameKey(key string) map[string][]string {
	keys := make(map[string][]string)
	_ = eachKey(func(tier string, _ int) error {
		keys[tier] = append(keys[tier], key)
		return nil
	})
	return keys
}

// render fills the template text with data.
func render(text string, data any) (string, error) {
	tmpl, err := template.New("").Option("missingkey=error").Parse(text)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	err = tmpl.Execute(&b, data)
	return b.String(), err
}

// newClient returns the HTTP client of one target: enough idle
// connections for every worker, no proxy from the environment, no
// compression.
func newClient() *http.Client {
	return &http.Client{
		Timeout: time.Minute,
		Transport: &http.Transport{
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     time.Minute,
			DisableCompression:  true,
		},
	}
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// needsRedis reports whether a target's store is the harness's Redis.
func needsRedis() bool {
	return slices.ContainsFunc(targets, func(t target) bool { return strings.Contains(t.store, "{{.Redis}}") })
}
