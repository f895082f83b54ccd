// Package vigthoria is a Caddy HTTP handler that puts an authenticating,
// rate-limiting proxy in front of the Vigthoria API: callers use their own
// keys, the server key never leaves the server.
package vigthoria

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/keystore"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
	"github.com/vigthoria/caddy-vigthoria/store"
	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"
)

// Defaults of the handler's configuration.
const (
	DefaultMaxBody        = 10_000_000 // 10 MB
	DefaultAuthFailLimit  = 20
	DefaultAuthFailWindow = time.Minute
	DefaultBodyTimeout    = 30 * time.Second
	DefaultMaxBuffered    = 64 << 20 // 64 MiB
)

// maxDefaultMaxTokens bounds default_max_tokens: the largest cap the
// API's fields take (an int32).
const maxDefaultMaxTokens = 1<<31 - 1

// DefaultStoreTimeout bounds a limit decision's wait for a shared store.
const DefaultStoreTimeout = 50 * time.Millisecond

// settleGrace is how long a shutdown waits for running requests to settle
// before the key store and its ledger close.
const settleGrace = 15 * time.Second

// maxTrackedAddrs bounds the memory of the failed-authentication throttle.
const maxTrackedAddrs = 1 << 20

var tierName = regexp.MustCompile(`^[a-z0-9_-]{1,64}$`)

// keyServices holds the key stores, shared by the configs that use the same
// store while a reload overlaps them, and closed when the last one goes.
var keyServices = caddy.NewUsagePool()

type keyService struct{ *keystore.Service }

func (s keyService) Destruct() error { return s.Stop() }

// limiters holds the limiters' state, which outlives config reloads; one
// per key store, since the store's ledger holds the quotas.
var limiters = caddy.NewUsagePool()

type pooledLimiter struct {
	limiter.Limiter
	shared *limiter.Redis // nil for none
	redis  *redis.Client  // the shared backend's connections; nil for none
	// release gives redis back to the store backend, which shares it
	// with the key store of the same URL (redisstore.SharedClient).
	release func() error
}

// Destruct stops the shared limiter's lease renewals and retries, then
// gives its connections back.
func (p pooledLimiter) Destruct() error {
	if p.redis == nil {
		return nil
	}
	p.shared.Close()
	return p.release()
}

// maxLimitedClients bounds the in-memory limiter: about 120 bytes each.
const maxLimitedClients = 4 << 20

// Tier is a named class of callers and its limits. Every field is
// optional: a tier without limits admits its callers freely. A client
// key may have settings of its own (caddy vigthoria key add --requests …,
// key update): each replaces the tier's field of the same name for that
// key's requests, and the fields it does not set follow the tier.
type Tier struct {
	// Requests allowed per window, as a token bucket: {"n":60,"window":"1m","burst":10}.
	// Burst defaults to n.
	Requests *Rate `json:"requests,omitempty"`

	// Prompt plus completion tokens allowed per window, as a token bucket.
	// A request reserves its estimate (prompt size plus max_tokens times its
	// choices: n or best_of for each prompt) and is then charged what the
	// upstream reports.
	Tokens *Rate `json:"tokens,omitempty"`

	// Requests in flight at once, streams included.
	Concurrent int `json:"concurrent,omitempty"`

	// Tokens allowed per calendar day or month (UTC): {"n":1000000,"period":"day"}.
	Quota *Quota `json:"quota,omitempty"`

	// Money allowed per calendar day or month (UTC), in the currency of
	// prices: {"amount":"50","period":"month"}. Admission reserves a
	// request's highest possible cost and settlement charges the real
	// one. A model without a price is then refused, unless unpriced is
	// free. Default: none.
	Budget *Budget `json:"budget,omitempty"`

	// Model globs this tier may use, e.g. ["vigthoria-fast-*"]; '*'
	// matches any run of characters, '/' included (see
	// policy.MatchModel). Default: all.
	Models []string `json:"models,omitempty"`

	// The most max_tokens (or max_completion_tokens) a request may ask,
	// per answer (choice); a request without a cap is forwarded with
	// this one. Default: no cap, and a request without one gets the
	// handler's default_max_tokens.
	MaxTokens int64 `json:"max_tokens,omitempty"`

	// The most bytes that the request bodies of this tier's callers may
	// hold at once: its share of the handler's max_buffered, there for it
	// whatever other tiers' callers send. Tiers without one split what
	// the others leave equally, except the anonymous tier, which gets
	// max_body, or an eighth of max_buffered when that is more (all of
	// the rest when it is the only tier left). At least max_body; the
	// tiers' shares add up to at most max_buffered.
	MaxBuffered int64 `json:"max_buffered,omitempty"`

	// The most bytes that one caller's bodies may hold of the tier's
	// share. Default: a quarter of the share, or concurrent times
	// max_body when that is less, and at least max_body.
	MaxBufferedPerCaller int64 `json:"max_buffered_per_caller,omitempty"`

	limits    limiter.Limits
	budget    limiter.Limits // the budget as a quota of micro-units; zero without a budget
	modelsKey string         // names the models policy in the models cache
	// lesser are the limits of requests that generate nothing, by
	// limitSet (less one): see limitsFor.
	lesser [3]limiter.Limits
	bodies *proxy.Share // MaxBuffered and MaxBufferedPerCaller, counted

	// keySettings are those of the caller's key, or of the key that
	// minted its token: their origins bind the caller (originAllowed).
	// nil for a configured tier.
	keySettings *policy.Settings
	// minter is the tier of the key that minted a token, with that key's
	// settings, for the token's user: its models and max_tokens narrow
	// this tier's, its limits and budget bound the key's users together,
	// its origins are theirs. nil for every other caller.
	minter      *Tier
	tokenModels []string // a minted token's own model globs; nil: the tiers'
}

// Rate is a number allowed per window.
type Rate struct {
	N      int64          `json:"n"`
	Window caddy.Duration `json:"window"`
	Burst  int64          `json:"burst,omitempty"`
}

// Quota is a number of tokens per calendar period: "day" or "month".
type Quota struct {
	N      int64  `json:"n"`
	Period string `json:"period"`
}

// Budget is an amount of money per calendar period: "day" or "month".
// The amount is a decimal string, such as "50" or "12.50", read exactly.
type Budget struct {
	Amount string `json:"amount"`
	Period string `json:"period"`
}

// limits is the budget as the limiter keeps it: a quota of micro-units
// of the currency, in an account of its own.
func (b *Budget) limits() (limiter.Limits, error) {
	n, err := policy.ParseMoney(b.Amount, policy.MaxMoney)
	if err != nil {
		return limiter.Limits{}, err
	}
	if n <= 0 {
		return limiter.Limits{}, fmt.Errorf("budget %s must be above zero", b.Amount)
	}
	period, err := parsePeriod(b.Period)
	if err != nil {
		return limiter.Limits{}, err
	}
	// A request holds its reservation until it is settled: in flight,
	// though there is no concurrency limit, so that a limiter never
	// forgets the account while its reservations are out.
	return limiter.Limits{Quota: limiter.Quota{N: n, Period: period}}, nil
}

// DefaultMaxTokens is the default of default_max_tokens: the cap a
// request without one is forwarded with, and reserves, when its tier
// sets none.
const DefaultMaxTokens = 4096

// provision checks the tier and derives its limiter limits.
func (t *Tier) provision(name string) error {
	for _, r := range []*Rate{t.Requests, t.Tokens} {
		if r != nil && (r.N <= 0 || r.Window <= 0 || r.Burst < 0) {
			return fmt.Errorf("tier %s: a rate needs a positive n and window", name)
		}
	}
	if t.Requests != nil {
		t.limits.Requests = limiter.Rate{N: t.Requests.N, Window: time.Duration(t.Requests.Window), Burst: t.Requests.Burst}
	}
	if t.Tokens != nil {
		t.limits.Tokens = limiter.Rate{N: t.Tokens.N, Window: time.Duration(t.Tokens.Window), Burst: t.Tokens.Burst}
	}
	if t.Concurrent < 0 || t.MaxTokens < 0 {
		return fmt.Errorf("tier %s: concurrent and max_tokens must be positive", name)
	}
	if t.MaxTokens > wire.MaxTokenCap {
		return fmt.Errorf("tier %s: max_tokens must be at most %d, the most a request may ask", name, wire.MaxTokenCap)
	}
	t.limits.Concurrent = t.Concurrent
	if t.Quota != nil {
		period, err := parsePeriod(t.Quota.Period)
		if err != nil || t.Quota.N <= 0 {
			return fmt.Errorf("tier %s: a quota needs a positive n and a period of day or month", name)
		}
		t.limits.Quota = limiter.Quota{N: t.Quota.N, Period: period}
	}
	if t.Budget != nil {
		var err error
		if t.budget, err = t.Budget.limits(); err != nil {
			return fmt.Errorf("tier %s: %v", name, err)
		}
	}
	for _, glob := range t.Models {
		if err := policy.CheckGlob(glob); err != nil {
			return fmt.Errorf("tier %s: invalid model glob '%s': %v", name, glob, err)
		}
	}
	t.modelsKey = proxy.FilterKey(t.Models)
	// Minting counts as a request, in no slot: a caller whose slots are
	// all taken by its streams may still mint, and minting never makes a
	// chat sent at that moment wait.
	mint := &t.lesser[mintLimits-1]
	*mint = t.limits
	mint.Concurrent, mint.NoSlot = 0, true
	// Reading one's standing, or the models one may use, reserves nothing
	// and spends nothing: a spent quota, budget or token bucket never
	// refuses it, only a request bucket of the tier's size (and for the
	// models, which may call the upstream, concurrency) in the caller's
	// reading account (see readPrefix).
	t.lesser[standingLimits-1] = limiter.Limits{Requests: t.limits.Requests, NoSlot: true}
	t.lesser[modelsLimits-1] = limiter.Limits{Requests: t.limits.Requests, Concurrent: t.limits.Concurrent}
	return nil
}

// limitSet names which of a tier's limits a request is admitted under.
type limitSet uint8

const (
	allLimits      limitSet = iota // a request that may generate
	mintLimits                     // POST /vigthoria/tokens
	standingLimits                 // GET /v1/usage
	modelsLimits                   // GET /v1/models
)

// reads reports whether s is a set of a request that reads, admitted
// in the caller's reading account.
func (s limitSet) reads() bool { return s == standingLimits || s == modelsLimits }

// limitsFor returns the tier's limits of a request of set s.
func (t *Tier) limitsFor(s limitSet) *limiter.Limits {
	if s == allLimits {
		return &t.limits
	}
	return &t.lesser[s-1]
}

// limitSetOf is the limit set of a request to the endpoint of ID id.
func limitSetOf(id int) limitSet {
	switch id {
	case proxy.Usage:
		return standingLimits
	case proxy.Models:
		return modelsLimits
	}
	return allLimits
}

// modelFilter is the models a caller of the tier may see in GET
// /v1/models: Allows is nil when it may use every model.
func (t *Tier) modelFilter() proxy.ModelFilter {
	f := proxy.ModelFilter{Key: t.modelsKey}
	if len(t.Models) > 0 || t.tokenModels != nil || t.minter != nil && len(t.minter.Models) > 0 {
		f.Allows = t.allows
	}
	return f
}

// allows reports whether a caller of the tier may use model: its
// models, those of the key that minted its token and the token's own
// all allow it.
func (t *Tier) allows(model string) bool {
	return matchesAny(t.Models, model) && matchesAny(t.tokenModels, model) &&
		(t.minter == nil || t.minter.allows(model))
}

// matchesAny reports whether model matches one of globs, or globs is
// empty: no narrowing.
func matchesAny(globs []string, model string) bool {
	if len(globs) == 0 {
		return true
	}
	for _, glob := range globs {
		if policy.MatchModel(glob, model) {
			return true
		}
	}
	return false
}

func parsePeriod(s string) (limiter.Period, error) {
	switch s {
	case "day":
		return limiter.Day, nil
	case "month":
		return limiter.Month, nil
	}
	return 0, fmt.Errorf("period '%s' is not day or month", s)
}

// Handler proxies the Vigthoria API. It serves only the API's five
// endpoints under /v1 (chat/completions, completions, models, embeddings,
// usage); anything else is answered here and never reaches the upstream.
type Handler struct {
	// Base URL of the API, http or https, with an optional base path:
	// /v1/chat/completions on the proxy goes to <upstream>/chat/completions.
	// Default: https://api.vigthoria.io/v1
	Upstream string `json:"upstream,omitempty"`

	// The server-side Vigthoria API key, sent to the upstream as a bearer
	// token. Use a placeholder resolved at run time, such as
	// {env.VIGTHORIA_API_KEY} or {file./run/secrets/vigthoria}: a literal
	// key is stored in Caddy's config (GET /config/, autosave.json).
	// Required; the handler refuses to start when it resolves to empty.
	APIKey string `json:"api_key,omitempty"`

	// The largest request body accepted, in bytes. A larger body is
	// refused with 413 before it is read (from Content-Length) or as soon
	// as the limit is crossed. Default: 10000000 (10 MB).
	MaxBody int64 `json:"max_body,omitempty"`

	// How long a caller may take to send its whole request body; a body
	// still arriving then is refused with 408. Default: 30s.
	BodyTimeout caddy.Duration `json:"body_timeout,omitempty"`

	// The most bytes that request bodies may hold at once, over the
	// whole process; a body that would pass it is refused with 503 and
	// Retry-After. Each tier has a share of it (see the tiers'
	// max_buffered), so that callers of one tier, however many, never
	// take what another tier's callers need. A body is held in memory
	// from its first byte until its answer ends, and memory grows with
	// the bytes that arrive, never with what Content-Length announces.
	// Default: 64 MiB, or four times max_body, or twice max_body per
	// tier, whichever is largest.
	//
	// The upstream's answers held in memory (a stream's event until it
	// is whole, up to 1 MiB; a JSON answer read whole before its status
	// is sent, up to 1 MiB) have a budget of their own of the same size:
	// past it, a stream ends with an upstream_stream_failed event and a
	// JSON answer passes unchecked, as it comes.
	MaxBuffered int64 `json:"max_buffered,omitempty"`

	// How long to wait for the upstream's response headers. A non-streamed
	// completion sends its headers only when the whole answer is ready, so
	// keep this above the slowest answer you expect; a timeout is a 504.
	// Default: 0, no limit.
	HeaderTimeout caddy.Duration `json:"header_timeout,omitempty"`

	// How long the upstream may stay silent in the middle of an answer,
	// once its headers came. A stalled stream then ends with an error
	// event, a stalled JSON answer is a 504. Reasoning models may think
	// for minutes between events, so keep this above their longest pause.
	// Default: 0, no limit.
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// Where client keys live: "sqlite:<path>" for the embedded store, or
	// "redis://…" for a store shared by several instances. Default:
	// sqlite:<Caddy data dir>/vigthoria/vigthoria.db
	Store string `json:"store,omitempty"`

	// The tiers callers belong to, by name ([a-z0-9_-]). A key whose tier
	// is not here is refused with 403.
	Tiers map[string]*Tier `json:"tiers,omitempty"`

	// The currency of prices and costs: a code such as USD or EUR, or a
	// short label of letters or currency signs. It labels costs in GET
	// /v1/usage; it converts nothing. Default: USD.
	Currency string `json:"currency,omitempty"`

	// What models cost, per million tokens, in the currency, in order:
	// the first entry whose model glob matches a request's model prices
	// it, e.g. [{"model": "vigthoria-fast-*", "input": 0.10, "output":
	// 0.40}]. Each request's cost is kept in the usage ledger in
	// micro-units (millionths) of the currency, rounded up, and GET
	// /v1/usage reports it. Default: none, and costs are not reported.
	Prices []*Price `json:"prices,omitempty"`

	// What a model that no price matches costs: "refuse" makes it
	// unavailable to callers with a budget, "free" prices it at 0.
	// Default: refuse.
	Unpriced string `json:"unpriced,omitempty"`

	// A placeholder naming a caller identified by an earlier Caddy auth
	// handler, e.g. {http.auth.user.id}. When it resolves to a value, that
	// value is the caller and no client key is needed. Default: none.
	Identity string `json:"identity,omitempty"`

	// The tier of callers found by identity: a tier name or a placeholder.
	// Default: the only configured tier (required when there are several).
	IdentityTier string `json:"identity_tier,omitempty"`

	// OpenID identity providers whose users call with the tokens the
	// provider gives them, one entry per issuer: a bearer credential that
	// is not a client key is verified as a JWT of one of these. Default:
	// none.
	JWT []*JWTIssuer `json:"jwt,omitempty"`

	// The longest life of a token minted by POST /vigthoria/tokens, at
	// most 24h. A token request may ask less; it gets 15m when it names
	// no ttl. Default: 1h.
	MaxTokenTTL caddy.Duration `json:"max_token_ttl,omitempty"`

	// The tier of callers without any credentials, who are then told apart
	// by client address (IPv6 by /64). Default: none, such callers get 401.
	Anonymous string `json:"anonymous,omitempty"`

	// Failed authentications allowed per client address within
	// auth_fail_window; then that address gets 429 until the window ends,
	// before any key lookup. Default: 20.
	AuthFailLimit int `json:"auth_fail_limit,omitempty"`

	// The window of auth_fail_limit. Default: 1m.
	AuthFailWindow caddy.Duration `json:"auth_fail_window,omitempty"`

	// How long GET /v1/models is answered from the cache before the
	// upstream is asked again; a negative value turns the cache off.
	// Default: 5m.
	ModelsCache caddy.Duration `json:"models_cache,omitempty"`

	// How many times an upstream 429, 502, 503 or failed connection is
	// retried, while nothing has reached the client yet. Default: 2.
	Retries *int `json:"retries,omitempty"`

	// What to do when the shared store (Redis) is down: "local" decides
	// with in-memory limits what the instance can prove the fleet has not
	// spent, its share (among the live instances) of what the rate limits
	// refill during the outage, and refuses with 503 callers whose tier
	// has a quota, budget or concurrency limit, so that the fleet never
	// admits more than its limits; "deny" refuses with 503;
	// "local_unshared" decides with in-memory limits, each instance with
	// the whole limits, and may admit up to as many times the limits, and
	// spend as many times the budgets, as there are instances. What was
	// admitted locally is charged to Redis when it answers again. A late
	// answer starts a probe and is waited for; only a failed probe makes
	// the instance hold Redis for down (logged, and the store_fallback
	// metric), until a probe answers; a call that failed meanwhile, alone,
	// is refused with 503 but under "local_unshared". Default: local.
	OnStoreError string `json:"on_store_error,omitempty"`

	// How long a limit decision may wait for the shared store's answer,
	// counted from when its round trip is sent (not its wait behind
	// other calls), before on_store_error applies to it. Default: 50ms.
	StoreTimeout caddy.Duration `json:"store_timeout,omitempty"`

	// Web origins (scheme://host[:port]) whose browser code may call the
	// API: their preflights are answered here and their answers readable,
	// rate-limit headers included. A request from any other origin is
	// refused with 403; requests without Origin (servers, SDKs) are not
	// affected. Callers identified by what a browser sends by itself
	// (identity, anonymous) are refused from any origin but the site's
	// own and these, cors or not. Default: none, CORS off.
	CORS []string `json:"cors,omitempty"`

	// The longest the retries of one request may wait in all, honouring
	// the upstream's Retry-After. Default: 10s.
	MaxWait caddy.Duration `json:"max_wait,omitempty"`

	// The longest the upstream's word alone stops callers: while it says
	// the server key (or a model) is spent, until its reset, its callers
	// get a local 429 upstream_rate_limited, but never for longer than
	// this; then one request at a time goes upstream (a probe, one in a
	// fleet) to learn whether it still refuses, and the next proof
	// restarts the lockout. Default: 1m.
	UpstreamLockout caddy.Duration `json:"upstream_lockout,omitempty"`

	// Request headers to pass to the upstream beyond the built-in
	// allowlist (Accept, Accept-Language, Content-Type, User-Agent,
	// X-Request-Id, X-Client-Request-Id, Traceparent, Tracestate,
	// Idempotency-Key, OpenAI-Beta and the SDKs' X-Stainless-*), e.g.
	// ["X-Trace-Id"]. Every other header of a caller stays here.
	// Credentials, hop-by-hop and upgrade headers, forwarding headers and
	// organisation selectors are refused. Default: none.
	UpstreamHeaders []string `json:"upstream_headers,omitempty"`

	// The output cap (max_tokens) that a completion request without one
	// is forwarded with, and reserves, when its tier sets no max_tokens:
	// a model given no cap may write up to its own output limit, past
	// what was reserved. It shrinks to what the caller's token limit
	// holds beside the prompt. Default: 4096.
	DefaultMaxTokens int64 `json:"default_max_tokens,omitempty"`

	// The field a chat completion request without a cap gets one in:
	// "max_completion_tokens", which OpenAI's chat models take and its
	// reasoning models require (they refuse max_tokens), or
	// "max_tokens", for an upstream that reads only that one (some
	// OpenAI-compatible servers ignore max_completion_tokens). A cap
	// field the request names, even as null, is used instead;
	// /v1/completions always gets max_tokens. Default:
	// max_completion_tokens.
	CapField string `json:"cap_field,omitempty"`

	// How many upstream calls whose caller left may go on to their end,
	// over the whole process (every site and config): the upstream bills
	// a request it received whether or not anyone reads the answer, so
	// such a call is read to its end, charged the usage the upstream
	// reports, and holds its caller's concurrency slot and reservation
	// until then. A caller who leaves while this many are running has
	// its call cut at once and is charged the most the upstream may bill
	// for it: each byte of its body as a prompt token and all the output
	// it reserved. 0 cuts every such call. Default: 256.
	MaxDetached *int `json:"max_detached,omitempty"`

	// How long a call may go on after its caller left; past it, the call
	// is cut and charged as one that could not go on. header_timeout and
	// idle_timeout bound it too. Default: 10m.
	DetachedTimeout caddy.Duration `json:"detached_timeout,omitempty"`

	// Alerts when a caller's use of its quota or budget crosses a
	// threshold, and when a request is first refused for want of either:
	// Caddy events always, a signed webhook when configured. Default:
	// events at 80% and 100%.
	Alerts *Alerts `json:"alerts,omitempty"`

	upstream     *proxy.Upstream
	bodyLimits   proxy.BodyLimits
	limiter      limiter.Limiter
	keys         *keystore.Service
	tokens       *keystore.TokenVerifier
	storeSpec    string // the key of keys in keyServices
	limiterKey   string // the key of limiter in limiters
	identityTier string // IdentityTier when it is a literal
	authFailures *limiter.FailureThrottle
	keyTiers     *lru.Cache[tierKey, *Tier] // see tierFor
	startOnce    sync.Once
	startErr     error
	active       atomic.Int64 // admitted requests not yet settled
	addrChecked  atomic.Bool  // whether callers may choose their address was checked (checkChosenAddr)
	logger       *zap.Logger
	accessLog    *zap.Logger // Caddy's access logger, for the lines written in place of its own (accessLine)
	notifier     *alerts.Notifier
	alertSender  string // the key of the webhook's sender in alertSenders; "" for none

	prices     []pricedGlob        // Prices, parsed, in order
	modelNames map[string]struct{} // the model names configured, labels (modelLabel)
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.vigthoria",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults, resolves the server key and loads the reverse
// proxy.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.accessLog = accessLogger(ctx)
	if h.Upstream == "" {
		h.Upstream = proxy.DefaultURL
	}
	if h.MaxBody == 0 {
		h.MaxBody = DefaultMaxBody
	}
	if h.BodyTimeout == 0 {
		h.BodyTimeout = caddy.Duration(DefaultBodyTimeout)
	}
	if h.MaxBuffered == 0 {
		h.MaxBuffered = max(DefaultMaxBuffered, 4*h.MaxBody, 2*int64(len(h.Tiers))*h.MaxBody)
	}
	h.bodyLimits = proxy.BodyLimits{Size: h.MaxBody, Timeout: time.Duration(h.BodyTimeout), MaxBuffered: h.MaxBuffered}
	if h.ModelsCache == 0 {
		h.ModelsCache = caddy.Duration(proxy.DefaultModelsTTL)
	}
	if h.Retries == nil {
		retries := proxy.DefaultRetries
		h.Retries = &retries
	}
	if h.MaxWait == 0 {
		h.MaxWait = caddy.Duration(proxy.DefaultMaxWait)
	}
	if h.UpstreamLockout == 0 {
		h.UpstreamLockout = caddy.Duration(proxy.DefaultLockout)
	}
	if h.MaxDetached == nil {
		n := proxy.DefaultMaxDetached
		h.MaxDetached = &n
	}
	if h.DetachedTimeout == 0 {
		h.DetachedTimeout = caddy.Duration(proxy.DefaultDetachedTimeout)
	}
	if h.APIKey != "" && !strings.Contains(h.APIKey, "{") {
		h.logger.Warn("api_key is a literal: it is stored in Caddy's config, readable through the admin API and autosave.json; use a placeholder such as {env.VIGTHORIA_API_KEY}")
	}
	// ReplaceAll, not ReplaceKnown: an unknown placeholder must resolve to
	// empty and fail here, not travel to the upstream as a literal.
	key := caddy.NewReplacer().ReplaceAll(h.APIKey, "")
	if key == "" {
		return errors.New("api_key resolves to an empty value: set it, e.g. api_key {env.VIGTHORIA_API_KEY} with VIGTHORIA_API_KEY in the environment")
	}
	if h.DefaultMaxTokens == 0 {
		h.DefaultMaxTokens = DefaultMaxTokens
	}
	switch h.CapField {
	case "":
		h.CapField = wire.MaxCompletionTokensField
	case wire.MaxCompletionTokensField, wire.MaxTokensField:
	default:
		return fmt.Errorf("cap_field must be max_completion_tokens or max_tokens, not '%s'", h.CapField)
	}
	for name, t := range h.Tiers {
		if t == nil {
			return fmt.Errorf("tier %s: null", name)
		}
		if err := t.provision(name); err != nil {
			return err
		}
	}
	h.keyTiers = newTierCache()
	h.provisionShares()

	if err := h.provisionPrices(); err != nil {
		return err
	}
	h.modelNames = h.configuredModels()

	if h.AuthFailLimit == 0 {
		h.AuthFailLimit = DefaultAuthFailLimit
	}
	if h.AuthFailWindow == 0 {
		h.AuthFailWindow = caddy.Duration(DefaultAuthFailWindow)
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	h.authFailures = limiter.NewFailureThrottle(h.AuthFailLimit, time.Duration(h.AuthFailWindow), maxTrackedAddrs)

	h.identityTier = h.IdentityTier
	if h.Identity != "" && h.IdentityTier == "" && len(h.Tiers) == 1 {
		for name := range h.Tiers {
			h.identityTier = name
		}
	}

	// Only a handle on the store here: it is opened when the config starts
	// (see App), never while Caddy merely validates. Placeholders (a Redis
	// password from the environment) are resolved here and kept out of
	// the config.
	if h.Store == "" {
		h.Store = "sqlite:" + store.DefaultSQLitePath()
	}
	spec, kind, err := storeSpec(h.Store)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if h.keys, err = loadKeyService(spec); err != nil {
		return fmt.Errorf("key store: %w", err)
	}
	h.storeSpec = spec

	if h.MaxTokenTTL == 0 {
		h.MaxTokenTTL = caddy.Duration(DefaultMaxTokenTTL)
	}
	if err := h.provisionJWT(caddy.Log().Named("vigthoria.jwt")); err != nil {
		return err
	}
	if err := h.provisionAlerts(ctx); err != nil {
		return err
	}

	if h.StoreTimeout == 0 {
		h.StoreTimeout = caddy.Duration(DefaultStoreTimeout)
	}
	policy := limiter.UseLocal
	switch h.OnStoreError {
	case "", "local":
	case "deny":
		policy = limiter.Deny
	case "local_unshared":
		policy = limiter.UseLocalUnshared
	default:
		return fmt.Errorf("on_store_error must be local, deny or local_unshared, not '%s'", h.OnStoreError)
	}
	h.limiterKey = "memory:" + spec
	if kind == "redis" {
		h.limiterKey = fmt.Sprintf("redis:%s:%d:%d", spec, policy, h.StoreTimeout)
	}
	lim, _, err := limiters.LoadOrNew(h.limiterKey, func() (caddy.Destructor, error) {
		if kind != "redis" {
			return pooledLimiter{Limiter: limiter.NewMemory(ledgerCounter{h.keys.Ledger()}, maxLimitedClients)}, nil
		}
		// The key store's client of the same URL: the limiter waits up
		// to a second for a late answer (a slow Redis is not a down
		// one), or store_timeout when longer, and reads must not give up
		// first.
		client, release, err := redisstore.SharedClient(spec, max(time.Duration(h.StoreTimeout), time.Second))
		if err != nil {
			return nil, fmt.Errorf("store: %w", err)
		}
		logger := caddy.Log().Named("vigthoria.limiter")
		shared := limiter.NewRedis(client, "vgt:lim:", time.Duration(h.StoreTimeout), logger)
		return pooledLimiter{
			Limiter: newFallback(shared, policy, logger),
			shared:  shared,
			redis:   client,
			release: release,
		}, nil
	})
	if err != nil {
		return err
	}
	h.limiter = lim.(pooledLimiter).Limiter

	// In a fleet, the upstream's word on the key's exhaustion is shared
	// by the instances that use the same key on the same upstream.
	var shared proxy.SharedExhaustion
	if client := lim.(pooledLimiter).redis; client != nil {
		shared = newRedisExhaustion(client, proxy.Fingerprint(h.Upstream, key), time.Duration(h.UpstreamLockout))
	}
	up, err := proxy.New(ctx, proxy.Config{
		URL:             h.Upstream,
		APIKey:          key,
		HeaderTimeout:   time.Duration(h.HeaderTimeout),
		IdleTimeout:     time.Duration(h.IdleTimeout),
		Retries:         *h.Retries,
		MaxWait:         time.Duration(h.MaxWait),
		UpstreamHeaders: h.UpstreamHeaders,
		Shared:          shared,
		Lockout:         time.Duration(h.UpstreamLockout),
		MaxDetached:     int64(*h.MaxDetached),
		DetachedTimeout: time.Duration(h.DetachedTimeout),
		MaxAnswers:      h.MaxBuffered,
	})
	if err != nil {
		return fmt.Errorf("setting up the upstream: %w", err)
	}
	h.upstream = up

	app, err := ctx.App("vigthoria")
	if err != nil {
		return err
	}
	app.(*App).register(h)
	return nil
}

// start opens the key store and fetches the jwt issuers' keys when the
// config starts; the first request calls it too, in case Caddy started
// the http app before ours.
func (h *Handler) start() error {
	h.startOnce.Do(func() {
		h.startJWT()
		if h.startErr = h.keys.Start(); h.startErr != nil {
			h.startErr = fmt.Errorf("starting the key store: %w", h.startErr)
			return
		}
		for tier, n := range h.keys.Tiers() {
			if _, ok := h.Tiers[tier]; !ok {
				h.logger.Warn("client keys of a tier that is not configured will be refused with 403",
					zap.String("tier", tier), zap.Int("keys", n))
			}
		}
	})
	return h.startErr
}

// Cleanup releases the key store; the last config using it closes it.
// Caddy cleans up while the old servers still finish their requests, so
// the last user first lets its requests settle, or their usage would miss
// the ledger's final write.
func (h *Handler) Cleanup() error {
	ownErr := errors.Join(h.cleanupAlerts(), h.cleanupJWT())
	if h.storeSpec == "" {
		return ownErr
	}
	// The last user of the key store, or of the limiter (a reload to
	// another store_timeout or on_store_error starts another), waits: the
	// limiter sends the settles it holds when it closes, and a settle
	// after that would be lost.
	storeRefs, _ := keyServices.References(h.storeSpec)
	limiterRefs, _ := limiters.References(h.limiterKey)
	if storeRefs <= 1 || limiterRefs <= 1 {
		h.waitActive(settleGrace)
		if h.active.Load() > 0 && h.upstream != nil {
			// Calls whose callers left wait for no one: cut, they settle
			// at once, charged the most the upstream may bill.
			h.upstream.CutDetached()
			h.waitActive(time.Second)
		}
		if n := h.active.Load(); n > 0 {
			h.logger.Warn("closing the key store or the limiter with requests still running; their usage may not be recorded",
				zap.Int64("requests", n))
		}
	}
	_, err := keyServices.Delete(h.storeSpec)
	_, err2 := limiters.Delete(h.limiterKey)
	return errors.Join(ownErr, err, err2)
}

// waitActive waits up to d for the admitted requests to settle.
func (h *Handler) waitActive(d time.Duration) {
	deadline := time.Now().Add(d)
	for h.active.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
}

// Validate checks the configuration after Provision.
func (h *Handler) Validate() error {
	if _, err := proxy.ParseURL(h.Upstream); err != nil {
		return err
	}
	if h.MaxBody < 0 {
		return fmt.Errorf("max_body must be positive, not %d", h.MaxBody)
	}
	if h.DefaultMaxTokens < 0 || h.DefaultMaxTokens > maxDefaultMaxTokens {
		return fmt.Errorf("default_max_tokens must be from 1 to %d, not %d", maxDefaultMaxTokens, h.DefaultMaxTokens)
	}
	for _, o := range h.CORS {
		if err := policy.CheckOrigin(o); err != nil {
			return fmt.Errorf("cors: %w", err)
		}
	}
	if h.BodyTimeout < 0 {
		return fmt.Errorf("body_timeout must be positive, not %s", time.Duration(h.BodyTimeout))
	}
	if h.MaxBuffered < h.MaxBody {
		return fmt.Errorf("max_buffered (%d) must be at least max_body (%d)", h.MaxBuffered, h.MaxBody)
	}
	if err := h.validateShares(); err != nil {
		return err
	}
	if h.HeaderTimeout < 0 {
		return fmt.Errorf("header_timeout must be positive, not %s", time.Duration(h.HeaderTimeout))
	}
	if h.IdleTimeout < 0 {
		return fmt.Errorf("idle_timeout must be positive, not %s", time.Duration(h.IdleTimeout))
	}
	for name, t := range h.Tiers {
		if !tierName.MatchString(name) {
			return fmt.Errorf("invalid tier name '%s': use a-z, 0-9, _ and -", name)
		}
		if name == "none" || name == "unknown" {
			return fmt.Errorf("tier name '%s' is reserved: metrics label callers without a configured tier with it", name)
		}
		if t == nil {
			return fmt.Errorf("tier %s: null", name)
		}
	}
	if h.Anonymous != "" && h.Tiers[h.Anonymous] == nil {
		return fmt.Errorf("anonymous tier '%s' is not configured", h.Anonymous)
	}
	if h.Identity != "" {
		switch {
		case h.identityTier == "":
			return errors.New("identity needs a tier when several tiers are configured")
		case !strings.Contains(h.identityTier, "{") && h.Tiers[h.identityTier] == nil:
			return fmt.Errorf("identity tier '%s' is not configured", h.identityTier)
		}
	}
	if err := validateJWTIssuers(h.JWT, h.Tiers); err != nil {
		return err
	}
	if h.MaxTokenTTL < caddy.Duration(time.Second) || time.Duration(h.MaxTokenTTL) > keystore.MaxTokenTTL {
		return fmt.Errorf("max_token_ttl must be between 1s and %s, not %s", keystore.MaxTokenTTL, time.Duration(h.MaxTokenTTL))
	}
	if *h.Retries < 0 || h.MaxWait < 0 {
		return errors.New("retries and max_wait must be positive")
	}
	if h.UpstreamLockout < caddy.Duration(time.Second) {
		return fmt.Errorf("upstream_lockout must be at least 1s, not %s", time.Duration(h.UpstreamLockout))
	}
	if *h.MaxDetached < 0 || h.DetachedTimeout < 0 {
		return errors.New("max_detached and detached_timeout must be positive")
	}
	if h.AuthFailLimit < 0 || h.AuthFailWindow < 0 {
		return errors.New("auth_fail_limit and auth_fail_window must be positive")
	}
	return nil
}

// ServeHTTP runs the request through the pipeline: route, identify,
// admit, read and police the body, reserve its tokens, forward, settle.
// Nothing that needs no body waits for one: a caller is identified and its
// request and concurrency limits are applied before a byte of its body is
// read, so that what an unknown or over-limit caller costs is bounded.
// Every refusal is answered here in the API's error shape.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) (err error) {
	if line, lw, lr := h.redactedLine(w, r); line != nil {
		defer func() { line.write(lr, err, h.logger); err = nil }()
		w, r = lw, lr
	}
	return h.serve(w, r, next)
}

// serve is ServeHTTP's pipeline.
func (h *Handler) serve(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	now := time.Now()
	if h.cors(w, r) {
		return nil
	}
	p := routePath(r)
	if strings.HasPrefix(p, "/vigthoria/") {
		if err := h.start(); err != nil {
			h.logger.Error("the key store is unavailable", zap.Error(err))
			return refuse(w, r, "none", "tokens", errUnavailable)
		}
		return h.serveOwn(w, r, p, now)
	}
	apiHeaders(w.Header())
	ep, apiErr := proxy.Route(r.Method, p)
	if apiErr != nil {
		return refuse(w, r, "none", "unknown", apiErr)
	}
	if ep.Body && !jsonContentType(r.Header) {
		return refuse(w, r, "none", ep.Name, errUnsupportedMediaType)
	}
	if err := h.start(); err != nil {
		h.logger.Error("the key store is unavailable", zap.Error(err))
		return refuse(w, r, "none", ep.Name, errUnavailable)
	}
	client, tier, apiErr := h.identify(w, r, now)
	if apiErr != nil {
		if client.ID != "" { // known, but of a tier not configured
			return h.refuseClient(w, r, client, h.tierLabel(client.Tier), ep.Name, apiErr, now)
		}
		return refuse(w, r, "none", ep.Name, apiErr)
	}
	if !originAllowed(r, tier) {
		return h.refuseClient(w, r, client, client.Tier, ep.Name, errKeyOriginNotAllowed, now)
	}
	if ambient(client.ID) && crossSite(r, h.CORS) {
		return h.refuseClient(w, r, client, client.Tier, ep.Name, errCrossSite, now)
	}

	// The key's exhaustion first, before anything is counted; a model's
	// once the body names it.
	cached := ep.ID == proxy.Models && h.ModelsCache > 0
	if !cached && ep.ID != proxy.Usage {
		if wait, exhausted := h.upstream.Exhausted(r.Context(), "", now); exhausted {
			return h.refuseClient(w, r, client, client.Tier, ep.Name, upstreamExhausted(w, "", wait), now)
		}
	}

	// Counted from its admission on: Cleanup waits for it before the
	// limiter closes.
	h.active.Add(1)
	defer h.active.Add(-1)
	a, apiErr := h.admit(w, r, client, tier, limitSetOf(ep.ID), now)
	if apiErr != nil {
		return h.refuseClient(w, r, client, client.Tier, ep.Name, apiErr, now)
	}
	if ep.ID == proxy.Usage {
		// Counted as a request, then settled before the report reads
		// the standing, which would otherwise count it in flight.
		h.settleAdmission(r, client, &a, ledger.Tokens{})
		requestsBy.get([3]string{client.Tier, ep.Name, "ok"}).Inc()
		return h.serveUsage(w, r, client, tier, now)
	}

	// Admitted: every way out from here settles, a panic included. A
	// request refused before it was forwarded frees its slot and is
	// charged nothing; a forwarded one is charged what it used.
	call := new(proxy.Call)
	var info wire.RequestInfo
	forwarded := false
	var running *ledger.Running // a stream's usage, recorded as it goes
	defer func() {
		if !forwarded {
			h.settleAdmission(r, client, &a, ledger.Tokens{})
			h.noteStanding(client, &a, ledger.Tokens{})
			return
		}
		usage := &call.Usage
		used := h.chargeFor(client.ID, client.Tier, info.Model, usage, a.Lease.Reserved, int64(len(call.Body)))
		end := time.Now()
		// The ledger first: a limiter that forgets an account once it is
		// settled reads its quota back from the ledger, which must then
		// hold this request.
		recorded := (usage.Status != 0 || used.Total() > 0) && ep.ID != proxy.Models
		model := ledgerModel(info.Model, usage.Status)
		switch {
		case running != nil:
			h.keys.Ledger().Finish(running, model, end, used, recorded)
		case recorded:
			h.keys.Ledger().Add(client.ID, model, end, used)
			if client.Minted != nil {
				// The minting key's rows hold its users' usage: its
				// quota counts from them after a restart.
				h.keys.Ledger().Add(client.Minted.KeyID, model, end, used)
			}
		}
		h.settleAdmission(r, client, &a, used)
		h.noteStanding(client, &a, used)
		h.record(r, client.Tier, ep.Name, info.Model, usage, used.Prompt, used.Completion)
	}()

	if ep.Body {
		body, apiErr := proxy.ReadBody(w, r, &h.bodyLimits, proxy.Holder{Share: tier.bodies, Caller: client.ID})
		if apiErr != nil {
			return h.refuseAdmitted(w, r, client, tier, ep, a.State, now, apiErr)
		}
		defer func() {
			r.Body = http.NoBody // it replays storage that goes back to the pool
			body.Release()
		}()
		var reserve int64
		if info, reserve, apiErr = h.police(r, ep, tier, body.Bytes(), call); apiErr != nil {
			if apiErr.Code == proxy.CodeRequestTooLarge {
				// No wait admits it: SDKs retry a 429 unless told not to.
				w.Header().Set("X-Should-Retry", "false")
			}
			return h.refuseAdmitted(w, r, client, tier, ep, a.State, now, apiErr)
		}
		call.Model = info.Model
		if wait, exhausted := h.upstream.Exhausted(r.Context(), info.Model, now); exhausted {
			return h.refuseAdmitted(w, r, client, tier, ep, a.State, now, upstreamExhausted(w, info.Model, wait))
		}
		if apiErr = h.reserve(w, r, client, tier, &a, info.Model, info.PromptTokens, reserve, now); apiErr != nil {
			return h.refuseClient(w, r, client, client.Tier, ep.Name, apiErr, now)
		}
	}
	// The limits it was admitted under: the standing of those it was not
	// checked against is not known here.
	limiter.SetHeaders(w.Header(), a.lim, a.State, now)

	if info.Stream {
		metrics.activeStreams.Inc()
		defer metrics.activeStreams.Dec()
	}
	forwarded = true
	if info.Stream {
		// After forwarded: the settle that finishes it is sure to run.
		running = h.recordStream(client, info.Model, call, a.Lease.Reserved)
	}
	var err error
	if cached {
		err = h.upstream.ServeModels(w, r, next, time.Duration(h.ModelsCache), tier.modelFilter(), call)
	} else {
		err = h.upstream.Forward(w, r, ep, next, call)
	}
	if err == nil {
		return nil
	}
	// A variable of its own: taking apiErr's address would move it to
	// the heap on every request.
	var answer *proxy.APIError
	if errors.As(err, &answer) {
		answer.Write(w)
		return nil
	}
	return err
}

// apiHeaders marks an API answer as the proxy's: never cached (it is one
// caller's, and speaks of its limits), never read as another type than
// its Content-Type says. The models cache sets its own Cache-Control
// over this one. Both values share one allocation.
func apiHeaders(h http.Header) {
	v := []string{"nosniff", "no-store"}
	h["X-Content-Type-Options"] = v[0:1:1]
	h["Cache-Control"] = v[1:2:2]
}

// recordStream has the ledger record a stream's usage as it goes, once a
// second (ledger.Running): its prompt's estimate and the output it
// carried so far, from its first delta on, as a stream cut short is
// charged (see charge). The meter reads one atomic counter.
func (h *Handler) recordStream(client keystore.Client, model string, call *proxy.Call, reserved int64) *ledger.Running {
	prompt := min(cmp.Or(call.Usage.Prompt, wire.PromptEstimate(int64(len(call.Body)))), reserved)
	p, priced := h.price(model)
	var also string
	if client.Minted != nil {
		also = client.Minted.KeyID
	}
	return h.keys.Ledger().Begin(client.ID, also, model, func() ledger.Tokens {
		streamed := call.Streamed()
		if streamed == 0 {
			return ledger.Tokens{}
		}
		t := ledger.Tokens{Prompt: prompt, Completion: streamed}
		if priced {
			t.Cost = p.cost(t.Prompt, t.Completion)
		}
		return t
	})
}

// upstreamExhausted is the 429 of a request while the upstream says the
// server key, or model when not "", is spent for wait more.
func upstreamExhausted(w http.ResponseWriter, model string, wait time.Duration) *proxy.APIError {
	secs := retrySeconds(wait)
	w.Header().Set("Retry-After", strconv.Itoa(secs))
	return proxy.UpstreamExhausted(model, secs)
}

// settle ends an admitted request in the limiter: used replaces its
// reservation and its slot is freed.
func (h *Handler) settle(r *http.Request, clientID string, lim *limiter.Limits, lease limiter.Lease, used int64) {
	if d, ok := h.limiter.(limiter.DeferredSettler); ok {
		// Redis: the caller does not wait for it, and the instance's
		// next call to Redis comes after it.
		d.SettleDeferred(clientID, lim, lease, used, time.Now())
		return
	}
	err := h.limiter.Settle(context.WithoutCancel(r.Context()), clientID, lim, lease, used, time.Now())
	if err != nil {
		h.logger.Error("settling usage", zap.String("client_id", clientID), zap.Error(err))
	}
}

// limitRefusal is the 429 of a request a limit refused, with the caller's
// limit headers set.
func limitRefusal(w http.ResponseWriter, tier *Tier, tierName string, d limiter.Decision, now time.Time) *proxy.APIError {
	limiter.SetHeaders(w.Header(), &tier.limits, d.State, now)
	limiter.SetRefusalHeaders(w.Header(), &tier.limits, d, now)
	return refusal(d, &tier.limits, tierName)
}

// refuseAdmitted answers an admitted request refused before it was
// forwarded, with the caller's standing, which counts it.
func (h *Handler) refuseAdmitted(w http.ResponseWriter, r *http.Request, client keystore.Client, tier *Tier, ep *proxy.Endpoint, s limiter.State, now time.Time, e *proxy.APIError) error {
	limiter.SetHeaders(w.Header(), &tier.limits, s, now)
	return h.refuseClient(w, r, client, client.Tier, ep.Name, e, now)
}

// unavailable is the 503 of a request whose limits could not be decided.
func (h *Handler) unavailable(w http.ResponseWriter, clientID string, err error) *proxy.APIError {
	if !errors.Is(err, limiter.ErrUnavailable) {
		h.logger.Error("deciding limits", zap.String("client_id", clientID), zap.Error(err))
	}
	w.Header().Set("Retry-After", "1")
	return errUnavailable
}

// tierLabel is a tier's name as a metric label: only configured tiers are
// labels, since a tier from a placeholder is the caller's to choose.
func (h *Handler) tierLabel(name string) string {
	if _, ok := h.Tiers[name]; ok {
		return name
	}
	if name == "" {
		return "none"
	}
	return "unknown"
}

// unansweredModel names, in the ledger, the model of requests the
// upstream did not answer with success: a name it refused is the
// caller's alone, and must not become a row of its own.
const unansweredModel = "(not answered)"

// ledgerModel is the model a request's usage is kept under.
func ledgerModel(model string, status int) string {
	if status >= 200 && status < 300 {
		return model
	}
	return unansweredModel
}

// refuse answers a request the proxy refused, counting it and noting the
// refusal in the access log.
func refuse(w http.ResponseWriter, r *http.Request, tier, endpoint string, e *proxy.APIError) error {
	refusalsBy.get([3]string{tier, endpoint, e.Code}).Inc()
	if extra := logFields(r); extra != nil {
		extra.Add(zap.Inline(refusedLog{tier: tier, reason: e.Code}))
	}
	e.Write(w)
	return nil
}

// refuseClient answers the refusal of an identified caller's request as
// refuse does, and counts it, by its reason, in the ledger's hourly rows
// of the caller, for the dashboard.
func (h *Handler) refuseClient(w http.ResponseWriter, r *http.Request, client keystore.Client, tier, endpoint string, e *proxy.APIError, now time.Time) error {
	if err := h.keys.Ledger().Refuse(client.ID, e.Code, now); err != nil {
		h.logger.Error("counting a refusal", zap.String("client_id", client.ID), zap.Error(err))
	}
	return refuse(w, r, tier, endpoint, e)
}

// record counts an admitted request's outcome and usage in the metrics
// and the access log.
func (h *Handler) record(r *http.Request, tier, endpoint, model string, u *proxy.AnswerUsage, prompt, completion int64) {
	result := outcome(u.Status)
	if u.Cache == "HIT" || u.Cache == "STALE" {
		result = "cached"
	}
	requestsBy.get([3]string{tier, endpoint, result}).Inc()
	if prompt+completion > 0 {
		tokens := tokensBy.get([2]string{tier, h.modelLabel(model)})
		tokens[0].Add(float64(prompt))
		tokens[1].Add(float64(completion))
	}
	if u.HeaderLatency > 0 {
		latencyBy.get(endpoint).Observe(u.HeaderLatency.Seconds())
	}
	if u.FirstEvent > 0 {
		metrics.firstByte.Observe(u.FirstEvent.Seconds())
	}
	if u.Retries > 0 {
		metrics.retries.Add(float64(u.Retries))
	}
	if u.Cache != "" {
		modelsCacheBy.get(u.Cache).Inc()
	}
	if extra := logFields(r); extra != nil {
		extra.Add(zap.Inline(&admittedLog{tier: tier, outcome: result, model: model, cache: u.Cache,
			prompt: prompt, completion: completion, retries: u.Retries}))
	}
}

// logFields returns where the fields of r's access log line go: Caddy's
// extra fields, or the line written in place of Caddy's (accessLine); nil
// when the server keeps no access log: each field added costs
// allocations, and nobody would read them.
func logFields(r *http.Request) logAdder {
	if l, ok := r.Context().Value(accessLineKey{}).(*accessLine); ok {
		return l
	}
	if srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); !ok || srv.Logs == nil {
		return nil
	}
	if extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields); ok && extra != nil {
		return extra
	}
	return nil
}

// refusedLog is what the access log says of a refused request.
type refusedLog struct{ tier, reason string }

func (l refusedLog) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("vigthoria_decision", "refused")
	enc.AddString("vigthoria_reason", l.reason)
	if l.tier != "none" {
		enc.AddString("vigthoria_tier", l.tier)
	}
	return nil
}

// admittedLog is what the access log says of an admitted request: one
// inline field, so that the request path appends one field to Caddy's
// list instead of eight.
type admittedLog struct {
	tier, outcome, model, cache string
	prompt, completion          int64
	retries                     int
}

func (l *admittedLog) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("vigthoria_decision", "admitted")
	enc.AddString("vigthoria_tier", l.tier)
	enc.AddString("vigthoria_outcome", l.outcome)
	if l.model != "" {
		enc.AddString("vigthoria_model", l.model)
	}
	enc.AddInt64("vigthoria_prompt_tokens", l.prompt)
	enc.AddInt64("vigthoria_completion_tokens", l.completion)
	if l.retries > 0 {
		enc.AddInt("vigthoria_retries", l.retries)
	}
	if l.cache != "" {
		enc.AddString("vigthoria_cache", l.cache)
	}
	return nil
}

func orNone(tier string) string {
	if tier == "" {
		return "none"
	}
	return tier
}

// routePath is the path to route on: the escaped form when the client
// escaped anything (RawPath is set), so that /v1/chat%2Fcompletions is not
// taken for /v1/chat/completions.
func routePath(r *http.Request) string {
	if r.URL.RawPath != "" {
		return r.URL.RawPath
	}
	return r.URL.Path
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
