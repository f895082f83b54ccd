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
	"github.com/vigthoria/caddy-vigthoria/internal/freeport"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/policy"
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
	// features are what the module's Caddyfile and store turn on; the
	// zero features for plain Caddy.
	features features
	// store is the module's key store spec (see store.ParseSpec), a
	// template of siteData too. The client keys are created in it before
	// Caddy starts. Empty: the target knows no client keys; requests
	// carry valid-looking keys that nobody checks.
	store string
	// bin is the Caddy binary that serves the target; empty: the one
	// being measured (-caddy).
	bin string
}

// features are what a module target turns on beyond one tier (bench)
// with limits of requests and tokens: the features of an operator's
// deployment, which the targets of the load have on and the ladder of
// features.go adds one at a time, and the tiers and callers the
// workloads need.
type features struct {
	Budget    bool // prices, and a budget in money on the bench tier
	Settings  bool // the bench tier's keys have settings of their own, in the store
	Alerts    bool // alerts with a webhook to the harness's receiver, at thresholds the load never reaches
	Dashboard bool // vigthoria_dashboard on a second site of its own port, behind basic_auth
	Queue     bool // queue 10s
	Timeouts  bool // header_timeout 10m and idle_timeout 5m, as the configuration's example sets them; only on a rung of the features' ladder, as the goals' features leave them out
	Pool      bool // a pool of three server keys and upstream_limits, neither reached
	JWT       bool // the stand-in OpenID provider's users, of the bench tier
	Minting   bool // a key of the bench tier that may mint tokens of it
	MixTiers  bool // the tiers of the mix workload, each with its client keys
}

// deployed are the features of the module targets of the load: what an
// operator would turn on, and every caller the workloads send as.
var deployed = features{Budget: true, Settings: true, Alerts: true, Dashboard: true, Queue: true, JWT: true, Minting: true, MixTiers: true}

// Names of the targets the goals compare.
const (
	upstreamName = "upstream"
	caddyName    = "caddy"
	moduleName   = "vigthoria"
	redisName    = "vigthoria-redis"
	// poolName is the module as moduleName with a pool of three server
	// keys and upstream_limits, none of them reached.
	poolName     = "vigthoria-pool"
	baselineName = "vigthoria-baseline"
)

// deployedAbout says what the module targets of the load turn on.
const deployedAbout = "a budget in money at the prices of the chat's model on the bench tier, settings of its own on each of its keys (requests, models), " +
	"`alerts` with a webhook to a receiver of the harness at thresholds the load never reaches, `vigthoria_dashboard` on a second site behind `basic_auth`, " +
	"`queue 10s` (unsaturated), an OpenID issuer, a key that mints tokens"

// targets are measured in this order in every round.
var targets = []target{
	{name: upstreamName, about: "the stand-in upstream alone, served by the harness process: the floor"},
	{name: caddyName, about: "plain Caddy: `reverse_proxy` with the server key set by `header_up`, what a user would do without this module", site: plainSite},
	{name: moduleName, about: "this module with its default store, SQLite (in a temporary directory), and what an operator would turn on: " + deployedAbout,
		site: moduleSite, features: deployed, store: "sqlite:{{.Dir}}/vigthoria.db"},
	{name: redisName, about: "this module as `" + moduleName + "` with the Redis store: keys, limits and usage in a redis-server on loopback, as a fleet shares them",
		site: moduleSite, features: deployed, store: "{{.Redis}}"},
	{name: poolName, about: "this module as `" + moduleName + "`, with a pool of three server keys and `upstream_limits` the load never reaches: what they cost unsaturated",
		site: moduleSite, features: with(deployed, func(f *features) { f.Pool = true }), store: "sqlite:{{.Dir}}/vigthoria.db"},
}

// with returns f changed by change.
func with(f features, change func(*features)) features {
	change(&f)
	return f
}

// baselineTarget is the module as another binary builds it, with the
// features and store of moduleName: a change's cost is the difference of
// the two rows of one run, not of two runs on a machine that drifted.
func baselineTarget(bin string) target {
	return target{
		name:  baselineName,
		about: "the module as `-baseline` builds it (an earlier commit), configured as `" + moduleName + "`: the same workloads in the same rounds, so that before and after a change come from one run",
		site:  moduleSite, features: deployed, store: "sqlite:{{.Dir}}/vigthoria.db", bin: bin,
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
	Webhook   string // the URL of the harness's alerts receiver

	DashboardPort int    // the dashboard site's port on 127.0.0.1
	OperatorHash  string // the bcrypt hash of the dashboard operator's password

	features
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
// benchTier of the single-client workloads, of the users of the stand-in
// OpenID provider and of minted tokens, and the mixTiers, each with a
// different set of limits to check (pro's include a budget in money, at
// the prices given, so that mix measures what costs and budgets add).
// What else it turns on is the target's features; none of their limits
// or thresholds is reached by the load.
const moduleSite = `
http://127.0.0.1:{{.Port}} {
	bind 127.0.0.1
	vigthoria {
		upstream {{.Upstream}}/v1
{{- if .Pool}}
		api_keys {
			{env.VIGTHORIA_API_KEY}
			{env.VIGTHORIA_KEY_B}
			{env.VIGTHORIA_KEY_C} weight 2
		}
		upstream_limits {
			requests 1000000000/1m
			concurrent 100000
		}
{{- else}}
		api_key {env.VIGTHORIA_API_KEY}
{{- end}}
		store {{.Store}}
		tier bench {
			requests 1000000000/1m
			tokens 1000000000000/1m
{{- if .Budget}}
			budget 10000/month
{{- end}}
		}
{{- if .MixTiers}}
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
		tier team {
			requests 1000000000/1m burst 1000000
		}
{{- end}}
{{- if or .Budget .MixTiers}}
		prices {
			vigthoria-fast-* input 0.10 output 0.40
		}
{{- end}}
{{- if .JWT}}
		jwt {{.Issuer}} {
			audience bench
			tier bench
		}
{{- end}}
{{- if .Minting}}
		max_token_ttl 24h
{{- end}}
{{- if .Alerts}}
		alerts {
			webhook {{.Webhook}}
			secret {env.VIGTHORIA_WEBHOOK_SECRET}
			at 80% 100%
		}
{{- end}}
{{- if .Queue}}
		queue 10s
{{- end}}
{{- if .Timeouts}}
		header_timeout 10m
		idle_timeout 5m
{{- end}}
	}
}
{{- if .Dashboard}}

http://127.0.0.1:{{.DashboardPort}} {
	bind 127.0.0.1
	basic_auth {
		operator {{.OperatorHash}}
	}
	vigthoria_dashboard {
		store {{.Store}}
	}
}
{{- end}}
`

// The tiers of the client keys. moduleSite configures each.
const benchTier = "bench"

var mixTiers = []string{"free", "pro", "team"}

// Callers that are not a tier's client keys, by their entry among the
// bearer tokens of an instance.
const (
	// signedIn is the stand-in OpenID provider's token of its user.
	signedIn = "jwt"
	// minted is the token that the minter's key got from the target for
	// a user of its app, as an app's backend gets one for its page.
	minted = "minted"
	// minter is the client key of the bench tier that may mint tokens of it.
	minter = "minter"
)

// keysPerTier is how many client keys each tier of the mix has.
const keysPerTier = 4

// benchKeySettings are the settings of the bench tier's keys of their
// own, over the tier's, as `caddy vigthoria key add --requests …
// --models …` sets them: a requests limit the load never reaches, and the
// models of the chats.
var benchKeySettings = [][2]string{{"requests", "1000000000/1m"}, {"models", "vigthoria-fast-*"}}

// instance is a target running.
type instance struct {
	target
	url    string              // where the API is, without /v1
	keys   map[string][]string // bearer tokens by tier, or by the other callers' names (signedIn, minted, minter)
	client *http.Client        // kept across measurements, with its connections
	caddy  *caddyProcess       // nil for the upstream
}

// upstream is the stand-in upstream, served in this process, with the
// stand-in OpenID provider of the signed-in users and what the
// operator's features talk to: the alerts' webhook receiver and the
// dashboard's login.
type upstream struct {
	*standin.Server
	url      string // http://127.0.0.1:PORT
	key      string // the server key
	srv      *http.Server
	issuer   *issuer
	hooks    *receiver
	operator operator
}

func startUpstream() (*upstream, error) {
	op, err := newOperator()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the stand-in upstream: %w", err)
	}
	iss, err := startIssuer()
	if err != nil {
		ln.Close()
		return nil, err
	}
	hooks, err := startReceiver()
	if err != nil {
		ln.Close()
		iss.srv.Close()
		return nil, err
	}
	key := "bench-server-" + rand.Text()
	up := &upstream{
		issuer:   iss,
		hooks:    hooks,
		operator: op,
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
	up.hooks.srv.Close()
	os.RemoveAll(dir)
}

// startTargets starts every target; when one fails, it stops the others.
func startTargets(ctx context.Context, ts []target, caddyBin, dir string, up *upstream, redisURL string) ([]*instance, error) {
	var insts []*instance
	for _, t := range ts {
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

// start runs target t: its client keys first, then its Caddy, until it
// serves every caller its features name.
func start(ctx context.Context, t target, caddyBin, dir string, up *upstream, redisURL string) (*instance, error) {
	inst := &instance{target: t, client: newClient()}
	if t.site == "" {
		inst.url = up.url
		inst.keys = sameKey(up.key)
		return inst, nil
	}
	data := siteData{Upstream: up.url, Dir: filepath.Join(dir, t.name), Redis: redisURL, Issuer: up.issuer.url,
		Webhook: up.hooks.url, OperatorHash: up.operator.hash, features: t.features}
	if err := os.Mkdir(data.Dir, 0o700); err != nil {
		return nil, err
	}
	for _, port := range []*int{&data.Port, &data.AdminPort, &data.DashboardPort} {
		var err error
		if *port, err = freeport.Take(); err != nil {
			return nil, err
		}
	}
	want, err := wantedKeys(t.features)
	if err != nil {
		return nil, err
	}
	if inst.keys, data.Store, err = clientKeys(ctx, t.store, data, want); err != nil {
		return nil, err
	}
	inst.keys[signedIn] = []string{up.issuer.token}
	if t.store == "" {
		inst.keys[minted] = []string{up.issuer.mintedLookalike}
	}
	caddyfile, err := render(globalOptions+t.site, data)
	if err != nil {
		return nil, err
	}
	inst.url = fmt.Sprintf("http://127.0.0.1:%d", data.Port)
	env := []string{
		"VIGTHORIA_API_KEY=" + up.key,
		"VIGTHORIA_KEY_B=" + up.key + "-b",
		"VIGTHORIA_KEY_C=" + up.key + "-c",
		"VIGTHORIA_WEBHOOK_SECRET=" + up.hooks.secret,
		"XDG_DATA_HOME=" + filepath.Join(data.Dir, "data"),
		"XDG_CONFIG_HOME=" + filepath.Join(data.Dir, "config"),
	}
	if t.bin != "" {
		caddyBin = t.bin
	}
	if inst.caddy, err = startCaddy(caddyBin, data.Dir, caddyfile, env, data.AdminPort); err != nil {
		return nil, err
	}
	if err := inst.ready(ctx, up, data.DashboardPort); err != nil {
		inst.caddy.stop()
		return nil, err
	}
	return inst, nil
}

// ready waits until inst serves its client key, then checks every other
// caller and part its features turn on: the signed-in user (whose first
// request waits for the issuer's keys), a token minted by the minter's
// key, kept for the workloads, and the dashboard, with the operator's
// login.
func (inst *instance) ready(ctx context.Context, up *upstream, dashboardPort int) error {
	models := inst.url + "/v1/models"
	if err := inst.caddy.waitReady(ctx, inst.client, models, inst.keys[benchTier][0]); err != nil {
		return err
	}
	f := inst.features
	if f.JWT {
		if err := inst.caddy.waitReady(ctx, inst.client, models, up.issuer.token); err != nil {
			return fmt.Errorf("the signed-in user: %w", err)
		}
	}
	if f.Minting {
		token, err := mintToken(ctx, inst.client, inst.url, inst.keys[minter][0])
		if err != nil {
			return err
		}
		inst.keys[minted] = []string{token}
		if err := inst.caddy.waitReady(ctx, inst.client, models, token); err != nil {
			return fmt.Errorf("the minted token: %w", err)
		}
	}
	if f.Dashboard {
		url := fmt.Sprintf("http://127.0.0.1:%d", dashboardPort)
		if err := up.operator.check(ctx, inst.client, url); err != nil {
			return fmt.Errorf("the dashboard: %w", err)
		}
	}
	return nil
}

// A wantedKey is a client key that a target's store is given before its
// Caddy starts.
type wantedKey struct {
	as    string // its entry among the instance's bearer tokens: its tier, or minter
	attrs keys.Attrs
}

// wantedKeys are the client keys of a module target with features f:
// the bench tier's, the mix tiers' and the minter's, as it has them.
func wantedKeys(f features) ([]wantedKey, error) {
	var own policy.Settings
	if f.Settings {
		for _, kv := range benchKeySettings {
			if err := policy.SettingFields[policy.FieldIndex(kv[0])].Parse(&own, kv[1]); err != nil {
				return nil, fmt.Errorf("the bench keys' %s: %w", kv[0], err)
			}
		}
	}
	want := []wantedKey{{as: benchTier, attrs: keys.Attrs{Name: "bench-bench-0", Tier: benchTier, Settings: own}}}
	if f.MixTiers {
		for _, tier := range mixTiers {
			for i := range keysPerTier {
				want = append(want, wantedKey{as: tier, attrs: keys.Attrs{Name: fmt.Sprintf("bench-%s-%d", tier, i), Tier: tier}})
			}
		}
	}
	if f.Minting {
		want = append(want, wantedKey{as: minter, attrs: keys.Attrs{Name: "bench-minter", Tier: benchTier, Mint: []string{benchTier}, Settings: own}})
	}
	return want, nil
}

// clientKeys creates the wanted client keys in the store that the
// template spec names, and returns them by their entry with the store's
// Caddyfile form. Without a store, they are new secrets that no store
// holds (newSecrets).
func clientKeys(ctx context.Context, spec string, data siteData, want []wantedKey) (map[string][]string, string, error) {
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
	for _, w := range want {
		var secret string
		if _, secret, err = keys.Create(ctx, svc.Store(), w.attrs, time.Now()); err != nil {
			break
		}
		secrets[w.as] = append(secrets[w.as], secret)
	}
	if stopErr := svc.Stop(); err == nil {
		err = stopErr
	}
	return secrets, kind + " " + where, err
}

// newSecrets returns well-formed client keys that no store knows, one
// for each key of a tier that the workloads use: a target without a
// store checks none.
func newSecrets() (map[string][]string, error) {
	all, err := wantedKeys(features{MixTiers: true})
	if err != nil {
		return nil, err
	}
	keys := make(map[string][]string)
	for _, w := range all {
		secret, err := clientkey.New()
		if err != nil {
			return nil, err
		}
		keys[w.as] = append(keys[w.as], secret)
	}
	return keys, nil
}

// sameKey returns key as every caller's bearer token: the upstream takes
// only its own.
func sameKey(key string) map[string][]string {
	keys := map[string][]string{benchTier: {key}, signedIn: {key}, minted: {key}}
	for _, tier := range mixTiers {
		for range keysPerTier {
			keys[tier] = append(keys[tier], key)
		}
	}
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

// needsRedis reports whether a target's store is the harness's Redis.
func needsRedis(ts []target) bool {
	return slices.ContainsFunc(ts, func(t target) bool { return strings.Contains(t.store, "{{.Redis}}") })
}
