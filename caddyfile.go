package vigthoria

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/dashboard"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
	"github.com/vigthoria/caddy-vigthoria/store"
)

func init() {
	caddy.RegisterModule(new(Handler))
	httpcaddyfile.RegisterHandlerDirective("vigthoria", parseCaddyfile)
	// After the authentication handlers, so that their identity is known;
	// before reverse_proxy, which it replaces for the API's routes.
	httpcaddyfile.RegisterDirectiveOrder("vigthoria", httpcaddyfile.Before, "reverse_proxy")
	httpcaddyfile.RegisterHandlerDirective("vigthoria_dashboard", parseDashboard)
	// After the authentication handlers (basic_auth, then forward_auth),
	// so that only an operator they let through reaches it.
	httpcaddyfile.RegisterDirectiveOrder("vigthoria_dashboard", httpcaddyfile.After, "forward_auth")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// parseDashboard reads the vigthoria_dashboard directive: the dashboard
// package parses its block, and only this package registers directives
// with Caddy's HTTP Caddyfile.
func parseDashboard(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(dashboard.Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	vigthoria {
//		upstream       <url>                  # default https://api.vigthoria.io/v1
//		api_key        <value>                # required unless api_keys, e.g. {env.VIGTHORIA_API_KEY}; repeatable: a pool
//		api_keys {                            # a pool of server keys (see APIKeys)
//			<key> [name <name>] [weight <n>] [models <glob>...]   # models last
//			probe_every <duration>             # of a refused key; default 30s
//		}
//		max_body       <size>                 # default 10MB
//		body_timeout   <duration>             # default 30s
//		max_buffered   <size>                 # default 64MiB, or 4 x max_body, or 2 x max_body per tier
//		header_timeout <duration>             # default none
//		idle_timeout   <duration>             # default none
//		store          sqlite [<path>] | redis <url>   # default sqlite in Caddy's data dir
//		tier <name> {                         # once per tier; every limit optional
//			requests   <n>/<window> [burst <b>]
//			tokens     <n>/<window> [burst <b>]
//			concurrent <n>
//			quota      <n>/day|month
//			budget     <amount>/day|month        # in the currency of prices
//			models     <glob>...
//			max_tokens <n>
//			max_buffered <size> [per_caller <size>]   # its share of max_buffered; see Tier
//			weight     <n>                     # 1 to 1000, its share of the upstream when requests queue; default 1
//			queue      <max_wait>|off [per_caller <m>]   # default the site's queue
//		}
//		queue          <max_wait>|off [length <n>] [per_caller <m>]   # default off; length 1000, per_caller length/16
//		upstream_limits {                     # what the proxy sends the upstream at most; default none
//			requests   <n>/<window> [burst <b>]
//			tokens     <n>/<window> [burst <b>]
//			concurrent <n>
//		}
//		currency       <label>                # of prices and costs; default USD
//		prices {                              # per 1M tokens; the first glob that matches wins
//			<glob> input <price> [output <price>]   # decimals, at most 6 places
//		}
//		unpriced       refuse|free            # a model without a price; default refuse
//		default_max_tokens <n>                # the cap of a request without one; default 4096
//		cap_field      max_completion_tokens|max_tokens   # where a chat gets it; default max_completion_tokens
//		jwt <issuer> {                        # once per OpenID provider
//			audience   <aud>...                # required
//			jwks_url   <url>                   # default from the issuer's discovery document
//			user_claim <claim>                 # default sub
//			tier_claim <claim>                 # its value is the tier when configured…
//			tier       <name>                  # …else this one; required without tier_claim
//			leeway     <duration>              # default 30s
//		}
//		max_token_ttl  <duration>             # of POST /vigthoria/tokens; default 1h, at most 24h
//		identity       <placeholder> [tier <name|placeholder>]
//		anonymous      <tier>                 # default off; the same as source anonymous <tier>
//		source <name> …                       # another identity source: a module of http.handlers.vigthoria.sources
//		auth_failures  <n>/<window>           # default 20/1m
//		models_cache   <ttl>|off              # default 5m
//		retries        <n> [max_wait <d>]     # default 2, max_wait 10s
//		upstream_lockout <duration>           # longest lockout on the upstream's word; default 1m
//		detached       <n>|off [per_caller <m>] [timeout <d>]  # calls going on after their caller left; default 256, per_caller n/16 (at least 1), timeout 10m
//		on_store_error local|deny|local_unshared   # default local
//		store_timeout  <duration>             # default 50ms
//		cors           <origin>...            # default off
//		upstream_headers <header>...          # more request headers to pass upstream
//		alerts {                              # Caddy events vigthoria.quota, .budget, .quota_refused, .budget_refused, and:
//			webhook <url>                      # default none: events only
//			secret  <whsec_…>                  # required with webhook, e.g. {env.VIGTHORIA_WEBHOOK_SECRET}
//			at      <pct>%...                  # default 80% 100%
//		}
//	}
//
// Each subdirective but tier and jwt may appear once, each tier name and
// each issuer once; unknown ones are errors.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.Errf("vigthoria takes no arguments on its line, got '%s'; use a block", d.Val())
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		name := d.Val()
		if seen[name] && name != "tier" && name != "jwt" && name != "source" && name != "api_key" {
			return d.Errf("subdirective '%s' given twice", name)
		}
		seen[name] = true
		var err error
		switch name {
		case "tier":
			name, t, err := parseTier(d, h.Tiers)
			if err != nil {
				return err
			}
			if h.Tiers == nil {
				h.Tiers = make(map[string]*policy.Tier)
			}
			h.Tiers[name] = t
		case "jwt":
			j, err := parseJWT(d, h.JWT)
			if err != nil {
				return err
			}
			h.JWT = append(h.JWT, j)
		case "prices":
			if h.Prices, err = parsePrices(d); err != nil {
				return err
			}
		case "source":
			if h.SourcesRaw, err = parseSource(d, h.SourcesRaw); err != nil {
				return err
			}
		case "currency":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if !policy.ValidCurrency(v) {
				return d.Errf("invalid currency '%s': want a code such as USD, or a short label of letters", v)
			}
			h.Currency = v
		case "unpriced":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if v != policy.UnpricedRefuse && v != policy.UnpricedFree {
				return d.Errf("invalid unpriced '%s': want refuse or free", v)
			}
			h.Unpriced = v
		case "default_max_tokens":
			if h.DefaultMaxTokens, err = parsePositive[int64](d.RemainingArgs()); err != nil || h.DefaultMaxTokens > maxDefaultMaxTokens {
				return d.Errf("invalid default_max_tokens: want one number from 1 to %d", maxDefaultMaxTokens)
			}
		case "cap_field":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if v != wire.MaxCompletionTokensField && v != wire.MaxTokensField {
				return d.Errf("invalid cap_field '%s': want max_completion_tokens or max_tokens", v)
			}
			h.CapField = v
		case "store":
			args := d.RemainingArgs()
			var ok bool
			if h.Store, ok = store.SpecFromArgs(args); !ok {
				return d.Errf("store takes 'sqlite [<path>]' or 'redis <url>', got '%s'", strings.Join(args, " "))
			}
		case "identity":
			args := d.RemainingArgs()
			switch {
			case len(args) == 1:
			case len(args) == 3 && args[1] == "tier":
				h.IdentityTier = args[2]
			default:
				return d.Errf("identity takes '<placeholder> [tier <name>]', got '%s'", strings.Join(args, " "))
			}
			h.Identity = args[0]
		case "anonymous":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			h.Anonymous = v
		case "models_cache":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if v == "off" {
				h.ModelsCache = -1
				break
			}
			ttl, err := caddy.ParseDuration(v)
			if err != nil || ttl <= 0 {
				return d.Errf("invalid models_cache '%s': want a positive duration such as 5m, or off", v)
			}
			h.ModelsCache = caddy.Duration(ttl)
		case "retries":
			args := d.RemainingArgs()
			if len(args) != 1 && !(len(args) == 3 && args[1] == "max_wait") {
				return d.Errf("retries takes '<n> [max_wait <duration>]', got '%s'", strings.Join(args, " "))
			}
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 0 {
				return d.Errf("invalid retries '%s': want 0 or more", args[0])
			}
			h.Retries = &n
			if len(args) == 3 {
				wait, err := caddy.ParseDuration(args[2])
				if err != nil || wait <= 0 {
					return d.Errf("invalid max_wait '%s': want a positive duration such as 10s", args[2])
				}
				h.MaxWait = caddy.Duration(wait)
			}
		case "detached":
			if h.MaxDetached, h.MaxDetachedPerCaller, h.DetachedTimeout, err = parseDetached(d); err != nil {
				return err
			}
		case "cors":
			h.CORS = d.RemainingArgs()
			if len(h.CORS) == 0 {
				return d.Err("cors needs at least one origin, such as https://app.example.com")
			}
			for _, o := range h.CORS {
				if err := policy.CheckOrigin(o); err != nil {
					return d.Errf("cors: %v", err)
				}
			}
		case "upstream_headers":
			h.UpstreamHeaders = d.RemainingArgs()
			if len(h.UpstreamHeaders) == 0 {
				return d.Err("upstream_headers needs at least one header name, such as X-Trace-Id")
			}
			if _, err := proxy.CheckUpstreamHeaders(h.UpstreamHeaders); err != nil {
				return d.Errf("%v", err)
			}
		case "on_store_error":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			if v != "local" && v != "deny" && v != "local_unshared" {
				return d.Errf("invalid on_store_error '%s': want local, deny or local_unshared", v)
			}
			h.OnStoreError = v
		case "store_timeout":
			if h.StoreTimeout, err = durationArg(d, "50ms"); err != nil {
				return err
			}
		case "upstream_lockout":
			if h.UpstreamLockout, err = durationArg(d, "1m"); err != nil {
				return err
			}
		case "auth_failures":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			n, window, err := parseRate(v)
			if err != nil {
				return d.Errf("invalid auth_failures '%s': %v", v, err)
			}
			h.AuthFailLimit, h.AuthFailWindow = n, caddy.Duration(window)
		case "upstream":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			h.Upstream = v
		case "api_key":
			v, err := singleArg(d)
			if err != nil {
				return err
			}
			// Each line is one key of the pool, weight 1: one alone
			// stays api_key, more go to api_keys.
			switch {
			case h.APIKey == "" && h.APIKeys == nil:
				h.APIKey = v
			case h.APIKeys == nil:
				h.APIKeys = &APIKeys{Keys: []ServerKeyConfig{{Key: h.APIKey}, {Key: v}}}
				h.APIKey = ""
			default:
				h.APIKeys.Keys = append(h.APIKeys.Keys, ServerKeyConfig{Key: v})
			}
		case "api_keys":
			keys, err := parseAPIKeys(d)
			if err != nil {
				return err
			}
			if h.APIKeys != nil {
				keys.Keys = append(h.APIKeys.Keys, keys.Keys...)
			}
			if h.APIKey != "" {
				keys.Keys = append([]ServerKeyConfig{{Key: h.APIKey}}, keys.Keys...)
				h.APIKey = ""
			}
			h.APIKeys = keys
		case "max_body":
			if h.MaxBody, err = sizeArg(d, "10MB"); err != nil {
				return err
			}
		case "max_buffered":
			if h.MaxBuffered, err = sizeArg(d, "64MiB"); err != nil {
				return err
			}
		case "body_timeout":
			if h.BodyTimeout, err = durationArg(d, "30s"); err != nil {
				return err
			}
		case "header_timeout":
			if h.HeaderTimeout, err = durationArg(d, "5m"); err != nil {
				return err
			}
		case "idle_timeout":
			if h.IdleTimeout, err = durationArg(d, "5m"); err != nil {
				return err
			}
		case "alerts":
			if h.Alerts, err = parseAlerts(d); err != nil {
				return err
			}
		case "queue":
			if h.Queue, err = parseQueue(d.RemainingArgs(), true); err != nil {
				return d.Errf("%v", err)
			}
		case "upstream_limits":
			if h.UpstreamLimits, err = parseUpstreamLimits(d); err != nil {
				return err
			}
		case "max_token_ttl":
			if h.MaxTokenTTL, err = durationArg(d, "1h"); err != nil {
				return err
			}
		default:
			return d.Errf("unknown subdirective '%s'", name)
		}
	}
	return nil
}

// parseTier reads `tier <name> { … }`, a name not among tiers; the block
// is optional.
func parseTier(d *caddyfile.Dispenser, tiers map[string]*policy.Tier) (string, *policy.Tier, error) {
	if !d.NextArg() {
		return "", nil, d.Err("tier needs a name")
	}
	name := d.Val()
	if d.NextArg() {
		return "", nil, d.Errf("tier takes one name and a block, got also '%s'", d.Val())
	}
	if _, dup := tiers[name]; dup {
		return "", nil, d.Errf("tier '%s' given twice", name)
	}
	t := new(policy.Tier)
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return "", nil, d.Errf("tier %s: '%s' given twice", name, sub)
		}
		seen[sub] = true
		args := d.RemainingArgs()
		var err error
		switch sub {
		case "requests":
			t.Requests, err = parseTierRate(args)
		case "tokens":
			t.Tokens, err = parseTierRate(args)
		case "concurrent":
			t.Concurrent, err = parsePositive[int](args)
		case "max_tokens":
			t.MaxTokens, err = parsePositive[int64](args)
			if err == nil && t.MaxTokens > wire.MaxTokenCap {
				err = fmt.Errorf("must be at most %d, the most a request may ask", wire.MaxTokenCap)
			}
		case "max_buffered":
			t.MaxBuffered, t.MaxBufferedPerCaller, err = parseTierBuffered(args)
		case "quota":
			t.Quota, err = parseQuota(args)
		case "budget":
			t.Budget, err = parseBudget(args)
		case "weight":
			t.Weight, err = parsePositive[int](args)
			if err == nil && t.Weight > policy.MaxWeight {
				err = fmt.Errorf("must be at most %d", policy.MaxWeight)
			}
		case "queue":
			t.Queue, err = parseQueue(args, false)
		case "models":
			if len(args) == 0 {
				err = errors.New("want at least one model glob")
			}
			t.Models = args
		default:
			return "", nil, d.Errf("unknown tier subdirective '%s'", sub)
		}
		if err != nil {
			return "", nil, d.Errf("tier %s: invalid %s '%s': %v", name, sub, strings.Join(args, " "), err)
		}
	}
	return name, t, nil
}

// parsePrices reads `prices { <glob> input <price> [output <price>] … }`,
// keeping the globs' order: the first that matches a model prices it.
func parsePrices(d *caddyfile.Dispenser) ([]*policy.Price, error) {
	if d.NextArg() {
		return nil, d.Errf("prices takes a block, not '%s'", d.Val())
	}
	var prices []*policy.Price
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		p := &policy.Price{Model: d.Val()}
		for _, other := range prices {
			if other.Model == p.Model {
				return nil, d.Errf("prices: '%s' given twice", p.Model)
			}
		}
		args := d.RemainingArgs()
		if len(args)%2 != 0 {
			return nil, d.Errf("prices: %s: want input <price> [output <price>], got '%s'", p.Model, strings.Join(args, " "))
		}
		for i := 0; i < len(args); i += 2 {
			word, v := args[i], policy.Decimal(args[i+1])
			switch {
			case word == "input" && p.Input == "":
				p.Input = v
			case word == "output" && p.Output == "":
				p.Output = v
			case word == "input" || word == "output":
				return nil, d.Errf("prices: %s: '%s' given twice", p.Model, word)
			default:
				return nil, d.Errf("prices: %s: unknown word '%s': want input <price> [output <price>]", p.Model, word)
			}
		}
		if err := p.Check(); err != nil {
			return nil, d.Errf("prices: %s: %v", p.Model, err)
		}
		prices = append(prices, p)
	}
	if len(prices) == 0 {
		return nil, d.Err("prices needs at least one line: <glob> input <price> [output <price>]")
	}
	return prices, nil
}

// parseJWT reads `jwt <issuer> { … }`, an issuer not among prior.
func parseJWT(d *caddyfile.Dispenser, prior []*JWTIssuer) (*JWTIssuer, error) {
	if !d.NextArg() {
		return nil, d.Err("jwt needs the issuer, such as https://tenant.auth0.com/")
	}
	j := &JWTIssuer{Issuer: d.Val()}
	if d.NextArg() {
		return nil, d.Errf("jwt takes one issuer and a block, got also '%s'", d.Val())
	}
	for _, other := range prior {
		if other.Issuer == j.Issuer {
			return nil, d.Errf("jwt issuer '%s' given twice", j.Issuer)
		}
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return nil, d.Errf("jwt %s: '%s' given twice", j.Issuer, sub)
		}
		seen[sub] = true
		var err error
		switch sub {
		case "audience":
			if j.Audience = d.RemainingArgs(); len(j.Audience) == 0 {
				return nil, d.Errf("jwt %s: audience needs at least one value", j.Issuer)
			}
		case "jwks_url":
			j.JWKSURL, err = singleArg(d)
		case "user_claim":
			j.UserClaim, err = singleArg(d)
		case "tier_claim":
			j.TierClaim, err = singleArg(d)
		case "tier":
			j.Tier, err = singleArg(d)
		case "leeway":
			j.Leeway, err = durationArg(d, "30s")
		default:
			return nil, d.Errf("unknown jwt subdirective '%s'", sub)
		}
		if err != nil {
			return nil, err
		}
	}
	if len(j.Audience) == 0 {
		return nil, d.Errf("jwt %s: audience is required", j.Issuer)
	}
	return j, nil
}

// parseAlerts reads `alerts { … }`.
func parseAlerts(d *caddyfile.Dispenser) (*Alerts, error) {
	if d.NextArg() {
		return nil, d.Errf("alerts takes a block, not '%s'", d.Val())
	}
	a := new(Alerts)
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return nil, d.Errf("alerts: '%s' given twice", sub)
		}
		seen[sub] = true
		var err error
		switch sub {
		case "webhook":
			a.Webhook, err = singleArg(d)
		case "secret":
			a.Secret, err = singleArg(d)
		case "at":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return nil, d.Err("alerts: at needs at least one threshold, such as 80%")
			}
			for _, arg := range args {
				n, perr := strconv.Atoi(strings.TrimSuffix(arg, "%"))
				if perr != nil || !strings.HasSuffix(arg, "%") || alerts.CheckThresholds([]int{n}) != nil {
					return nil, d.Errf("alerts: invalid threshold '%s': want a percentage from 1%% to 100%%, such as 80%%", arg)
				}
				a.At = append(a.At, n)
			}
		default:
			return nil, d.Errf("unknown alerts subdirective '%s'", sub)
		}
		if err != nil {
			return nil, err
		}
	}
	if a.Secret != "" && a.Webhook == "" {
		return nil, d.Err("alerts: secret needs a webhook")
	}
	if a.Webhook != "" && a.Secret == "" {
		return nil, d.Err("alerts: webhook needs a secret (whsec_…), such as {env.VIGTHORIA_WEBHOOK_SECRET}")
	}
	return a, nil
}

// parseTierRate reads "<n>/<window> [burst <b>]".
func parseTierRate(args []string) (*policy.TierRate, error) {
	r, err := policy.ParseRate(strings.Join(args, " "))
	if err != nil {
		return nil, err
	}
	return &policy.TierRate{N: r.N, Window: caddy.Duration(r.Window), Burst: r.Burst}, nil
}

// parseQuota reads "<n>/day" or "<n>/month".
func parseQuota(args []string) (*policy.Quota, error) {
	if len(args) != 1 {
		return nil, errors.New("want <n>/day or <n>/month")
	}
	q, err := policy.ParseQuota(args[0])
	if err != nil {
		return nil, err
	}
	return &policy.Quota{N: q.N, Period: q.Period}, nil
}

// parseBudget reads `budget <amount>/day|month`, such as 50/month.
func parseBudget(args []string) (*policy.Budget, error) {
	if len(args) != 1 {
		return nil, errors.New("want <amount>/day or <amount>/month, such as 50/month")
	}
	amount, period, _ := strings.Cut(args[0], "/")
	b := &policy.Budget{Amount: amount, Period: period}
	err := b.Check()
	return b, err
}

// parsePositive reads the one argument as a positive integer.
func parsePositive[T int | int64](args []string) (T, error) {
	if len(args) != 1 {
		return 0, errors.New("want one number")
	}
	n, err := strconv.ParseInt(args[0], 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("'%s' is not a positive number", args[0])
	}
	return T(n), nil
}

// parseRate reads "<n>/<duration>", e.g. 20/1m.
func parseRate(s string) (int, time.Duration, error) {
	r, err := policy.ParseRate(s)
	if err != nil {
		return 0, 0, err
	}
	if r.Burst != 0 || r.N > math.MaxInt32 {
		return 0, 0, errors.New("want <count>/<window>, such as 20/1m")
	}
	return int(r.N), r.Window, nil
}

// singleArg returns the one argument of the current subdirective.
func singleArg(d *caddyfile.Dispenser) (string, error) {
	name := d.Val()
	if !d.NextArg() {
		return "", d.Errf("%s needs a value", name)
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.Errf("%s takes one value, got also '%s'", name, d.Val())
	}
	return v, nil
}

// durationArg reads a subdirective's one positive duration; example
// shows a sensible value in the error.
func durationArg(d *caddyfile.Dispenser, example string) (caddy.Duration, error) {
	name := d.Val()
	v, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	dur, err := caddy.ParseDuration(v)
	if err != nil || dur <= 0 {
		return 0, d.Errf("invalid %s '%s': want a positive duration such as %s", name, v, example)
	}
	return caddy.Duration(dur), nil
}

// sizeArg reads the single argument of the current subdirective as a
// positive size in bytes, such as 10MB.
func sizeArg(d *caddyfile.Dispenser, example string) (int64, error) {
	name := d.Val()
	v, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	size, ok := parseSize(v)
	if !ok {
		return 0, d.Errf("invalid %s '%s': want a positive size such as %s", name, v, example)
	}
	return size, nil
}

// parseSize reads a positive size such as 10MB or 64MiB.
func parseSize(v string) (int64, bool) {
	size, err := humanize.ParseBytes(v)
	return int64(size), err == nil && size > 0 && size <= math.MaxInt64
}

// parseTierBuffered reads a tier's `max_buffered <size> [per_caller <size>]`.
func parseTierBuffered(args []string) (share, perCaller int64, err error) {
	const want = "want <size> [per_caller <size>] of positive sizes, such as 8MiB per_caller 2MiB"
	if len(args) != 1 && (len(args) != 3 || args[1] != "per_caller") {
		return 0, 0, errors.New(want)
	}
	share, ok := parseSize(args[0])
	if ok && len(args) == 3 {
		perCaller, ok = parseSize(args[2])
	}
	if !ok {
		return 0, 0, errors.New(want)
	}
	return share, perCaller, nil
}

// parseQueue reads `queue <max_wait>|off [length <n>] [per_caller <m>]`;
// a tier's (site false) takes no length.
func parseQueue(args []string, site bool) (*policy.Queue, error) {
	shape := "want <max_wait>|off [length <n>] [per_caller <m>], such as 5s per_caller 16"
	if !site {
		shape = "want <max_wait>|off [per_caller <m>], such as 5s"
	}
	if len(args)%2 != 1 {
		return nil, fmt.Errorf("queue: %s, got '%s'", shape, strings.Join(args, " "))
	}
	q := new(policy.Queue)
	if args[0] == "off" {
		if len(args) > 1 {
			return nil, errors.New("queue: off takes nothing more")
		}
		q.Off = true
		return q, nil
	}
	wait, err := caddy.ParseDuration(args[0])
	if err != nil || wait <= 0 || wait > policy.MaxQueueWait {
		return nil, fmt.Errorf("queue: invalid max_wait '%s': want a duration above 0 and at most %s, such as 5s, or off", args[0], policy.MaxQueueWait)
	}
	q.MaxWait = caddy.Duration(wait)
	seen := make(map[string]bool, 2)
	for i := 1; i < len(args); i += 2 {
		name, value := args[i], args[i+1]
		if seen[name] || name != "per_caller" && (name != "length" || !site) {
			return nil, fmt.Errorf("queue: %s, got '%s'", shape, strings.Join(args, " "))
		}
		seen[name] = true
		n, err := parsePositive[int]([]string{value})
		if err != nil {
			return nil, fmt.Errorf("queue: invalid %s '%s': want 1 or more", name, value)
		}
		if name == "length" {
			q.Length = n
		} else {
			q.PerCaller = n
		}
	}
	return q, q.Check(site)
}

// parseUpstreamLimits reads `upstream_limits { requests …; tokens …;
// concurrent <n> }`.
func parseUpstreamLimits(d *caddyfile.Dispenser) (*policy.UpstreamLimits, error) {
	if d.NextArg() {
		return nil, d.Errf("upstream_limits takes a block, not '%s'", d.Val())
	}
	u := new(policy.UpstreamLimits)
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return nil, d.Errf("upstream_limits: '%s' given twice", sub)
		}
		seen[sub] = true
		args := d.RemainingArgs()
		var err error
		switch sub {
		case "requests":
			u.Requests, err = parseTierRate(args)
		case "tokens":
			u.Tokens, err = parseTierRate(args)
		case "concurrent":
			u.Concurrent, err = parsePositive[int](args)
		default:
			return nil, d.Errf("unknown upstream_limits subdirective '%s'", sub)
		}
		if err != nil {
			return nil, d.Errf("upstream_limits: invalid %s '%s': %v", sub, strings.Join(args, " "), err)
		}
	}
	if _, err := u.Limits(); err != nil {
		return nil, d.Errf("%v", err)
	}
	return u, nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)

// parseDetached parses `detached <n>|off [per_caller <m>] [timeout <d>]`
// into max_detached, max_detached_per_caller and detached_timeout.
func parseDetached(d *caddyfile.Dispenser) (n *int, perCaller int, timeout caddy.Duration, err error) {
	args := d.RemainingArgs()
	shape := func() (*int, int, caddy.Duration, error) {
		return nil, 0, 0, d.Errf("detached takes '<n>|off [per_caller <m>] [timeout <duration>]', got '%s'", strings.Join(args, " "))
	}
	if len(args)%2 != 1 {
		return shape()
	}
	max, err := strconv.Atoi(args[0])
	if args[0] == "off" {
		max, err = 0, nil
	}
	if err != nil || max < 0 {
		return nil, 0, 0, d.Errf("invalid detached '%s': want 0 or more, or off", args[0])
	}
	seen := make(map[string]bool, 2)
	for i := 1; i < len(args); i += 2 {
		name, value := args[i], args[i+1]
		if seen[name] {
			return shape()
		}
		seen[name] = true
		switch name {
		case "per_caller":
			m, err := strconv.Atoi(value)
			if err != nil || m < 1 {
				return nil, 0, 0, d.Errf("invalid detached per_caller '%s': want 1 or more", value)
			}
			perCaller = m
		case "timeout":
			t, err := caddy.ParseDuration(value)
			if err != nil || t <= 0 {
				return nil, 0, 0, d.Errf("invalid detached timeout '%s': want a positive duration such as 10m", value)
			}
			timeout = caddy.Duration(t)
		default:
			return shape()
		}
	}
	return &max, perCaller, timeout, nil
}

// parseSource reads `source <name> …` into the identity source module of
// that name, which parses the rest itself, and adds it to sources.
func parseSource(d *caddyfile.Dispenser, sources caddy.ModuleMap) (caddy.ModuleMap, error) {
	if !d.NextArg() {
		return nil, d.Err("source needs a name: source <name> …")
	}
	name := d.Val()
	if _, dup := sources[name]; dup {
		return nil, d.Errf("source %s given twice", name)
	}
	mod, err := caddyfile.UnmarshalModule(d, caller.Namespace+"."+name)
	if err != nil {
		return nil, err
	}
	if sources == nil {
		sources = make(caddy.ModuleMap)
	}
	sources[name] = caddyconfig.JSON(mod, nil)
	return sources, nil
}
