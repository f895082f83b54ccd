// Package vigthoria is a Caddy HTTP handler that puts an authenticating,
// rate-limiting proxy in front of the Vigthoria API: callers use their own
// keys, the server key never leaves the server.
package vigthoria

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/admission"
	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/header"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/caller/token"
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

type keyService struct{ *keys.Service }

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

// ledgerCounter reads what a client used of its quota from the ledger,
// so that quotas and budgets survive a restart: tokens for a client,
// cost for its budget account.
type ledgerCounter struct{ ledger *ledger.Ledger }

func (c ledgerCounter) QuotaUsed(ctx context.Context, client string, since time.Time) (int64, error) {
	if id, ok := strings.CutPrefix(client, admission.BudgetPrefix); ok {
		return c.ledger.CostUsed(ctx, id, since)
	}
	return c.ledger.QuotaUsed(ctx, client, since)
}

// maxLimitedClients bounds the in-memory limiter: about 120 bytes each.
const maxLimitedClients = 4 << 20

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
	// Required unless api_keys is set; the handler refuses to start when
	// it resolves to empty. With api_keys, it is one more key of the pool
	// (weight 1, every model).
	APIKey string `json:"api_key,omitempty"`

	// A pool of server keys, in place of api_key or besides it: each
	// request goes to the key with the most room for its model, by
	// weight; a key the upstream refuses is out until a probe passes.
	// Default: none, api_key alone.
	APIKeys *APIKeys `json:"api_keys,omitempty"`

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

	// How long each attempt waits for the upstream's response headers. A
	// non-streamed completion sends its headers only when the whole
	// answer is ready, so keep this above the slowest answer you expect.
	// A timeout is a 504 to the caller; a request the upstream received
	// goes on then as a detached call, and is charged what the upstream
	// reports. Default: 0, no limit.
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
	Tiers map[string]*policy.Tier `json:"tiers,omitempty"`

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
	Prices []*policy.Price `json:"prices,omitempty"`

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
	// by client address (IPv6 by /64): the same as the source anonymous
	// with this tier. Default: none, such callers get 401.
	Anonymous string `json:"anonymous,omitempty"`

	// More identity sources, by name: Caddy modules of the namespace
	// http.handlers.vigthoria.sources, each naming callers from a kind
	// of credential. They are asked, in the order of their names, after
	// identity, client keys and JWTs. Default: none.
	SourcesRaw caddy.ModuleMap `json:"sources,omitempty" caddy:"namespace=http.handlers.vigthoria.sources"`

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

	// How many of the max_detached calls one caller (a client ID, as its
	// usage is charged) may hold at once, so that a caller who hangs up
	// many calls cannot leave none to others: past it, the caller's own
	// call is cut and charged as above. Default: a sixteenth of
	// max_detached, at least 1.
	MaxDetachedPerCaller int `json:"max_detached_per_caller,omitempty"`

	// How long a call may go on after its caller left, or was answered
	// at header_timeout; past it, the call is cut and charged as one that
	// could not go on. idle_timeout bounds it too. Default: 10m.
	DetachedTimeout caddy.Duration `json:"detached_timeout,omitempty"`

	// Alerts when a caller's use of its quota or budget crosses a
	// threshold, and when a request is first refused for want of either:
	// Caddy events always, a signed webhook when configured. Default:
	// events at 80% and 100%.
	Alerts *Alerts `json:"alerts,omitempty"`

	// How long a request waits for capacity instead of an instant 429:
	// for its caller's own concurrency slot, the upstream_limits and the
	// upstream's word that the key is spent, in a weighted fair queue
	// (tiers by weight, callers of a tier in turn):
	// {"max_wait": "5s", "length": 1000, "per_caller": 62}. A tier's
	// queue overrides it. Default: off, an instant 429.
	Queue *policy.Queue `json:"queue,omitempty"`

	// What the proxy sends the upstream at most, over every caller of
	// the site: {"requests": {"n": 100, "window": "1s"}, "tokens": {…},
	// "concurrent": 50}. With a store redis the limits hold across the
	// fleet. A request past them waits in the queue, or is refused with
	// 429 when its tier has none. Default: none.
	UpstreamLimits *policy.UpstreamLimits `json:"upstream_limits,omitempty"`

	queue         *admission.Queue // nil when neither queue nor upstream_limits is set
	upstream      *proxy.Upstream
	bodyLimits    proxy.BodyLimits
	limiter       limiter.Limiter
	keys          *keys.Service
	tokens        *token.Verifier
	storeSpec     string // the key of keys in keyServices
	releaseTiers  func() // tells keys the tiers of this config no longer are
	limiterKey    string // the key of limiter in limiters
	identityTier  string // IdentityTier when it is a literal
	sources       caller.Sources
	anonymousTier string // the anonymous source's tier; "" for none
	authFailures  *limiter.FailureThrottle
	startOnce     sync.Once
	startErr      error
	active        atomic.Int64 // admitted requests not yet settled
	addrChecked   atomic.Bool  // whether callers may choose their address was checked (checkChosenAddr)
	namesChecked  atomic.Bool  // whether the site's host names were checked (checkSiteNames)
	logger        *zap.Logger
	accessLog     *zap.Logger // Caddy's access logger, for the lines written in place of its own (accessLine)
	notifier      *alerts.Notifier
	alertSender   string // the key of the webhook's sender in alertSenders; "" for none

	policy     *policy.Policy
	admitter   *admission.Admitter
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
	if err := h.setDefaults(); err != nil {
		return err
	}
	serverKeys, err := h.serverKeys()
	if err != nil {
		return err
	}
	configured, err := h.loadSources(ctx)
	if err != nil {
		return err
	}
	h.policy, err = policy.New(policy.Config{
		Tiers: h.Tiers, Prices: h.Prices, Currency: h.Currency, Unpriced: h.Unpriced,
		DefaultMaxTokens: h.DefaultMaxTokens, CapField: h.CapField, Anonymous: h.anonymousTier,
		MaxBody: h.MaxBody, MaxBuffered: h.MaxBuffered, Logger: h.logger,
	})
	if err != nil {
		return err
	}
	h.modelNames = configuredModels(h.Tiers, h.Prices)
	h.bodyLimits = proxy.BodyLimits{Size: h.MaxBody, Timeout: time.Duration(h.BodyTimeout), MaxBuffered: h.MaxBuffered}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	h.authFailures = limiter.NewFailureThrottle(h.AuthFailLimit, time.Duration(h.AuthFailWindow), maxTrackedAddrs)

	// Only a handle on the store here: it is opened when the config starts
	// (see App), never while Caddy merely validates. Placeholders (a Redis
	// password from the environment) are resolved here and kept out of
	// the config.
	spec, kind, err := storeSpec(h.Store)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if h.keys, err = loadKeyService(spec); err != nil {
		return fmt.Errorf("key store: %w", err)
	}
	h.storeSpec = spec
	// The admin API refuses a key of a tier no loaded config has.
	h.releaseTiers = h.keys.UseTiers(slices.Collect(maps.Keys(h.Tiers)))
	if err := h.provisionJWT(caddy.Log().Named("vigthoria.jwt")); err != nil {
		return err
	}
	// The identity sources, in the order they are asked.
	if h.Identity != "" {
		h.sources = append(h.sources, &header.Source{Identity: h.Identity, Tier: h.identityTier})
	}
	h.sources = append(h.sources, h.keys.Source(), h.tokens)
	h.sources = append(h.sources, configured...)
	if err := h.provisionAlerts(ctx); err != nil {
		return err
	}

	lim, err := h.provisionLimiter(spec, kind)
	if err != nil {
		return err
	}
	h.limiter = lim.Limiter
	h.admitter = &admission.Admitter{Limiter: h.limiter, Policy: h.policy, Notifier: h.notifier, Logger: h.logger}
	if err := h.provisionQueue(ctx, serverKeys); err != nil {
		return err
	}

	// In a fleet, the upstream's word on each key's exhaustion, and on
	// its refusal, is shared by the instances that use the same key on
	// the same upstream.
	var shared func(fingerprint string) proxy.SharedExhaustion
	if lim.redis != nil {
		shared = func(fingerprint string) proxy.SharedExhaustion {
			return newRedisExhaustion(lim.redis, fingerprint, time.Duration(h.UpstreamLockout))
		}
	}
	var probeEvery time.Duration
	if h.APIKeys != nil {
		probeEvery = time.Duration(h.APIKeys.ProbeEvery)
	}
	var spent, served func(time.Time) // a queue learns its pace from the upstream's answers
	if h.queue.Learns() {
		spent, served = h.queue.Spent, h.queue.Served
	}
	if h.upstream, err = proxy.New(ctx, proxy.Config{
		URL:             h.Upstream,
		Keys:            serverKeys,
		MatchModel:      policy.MatchModel,
		ProbeEvery:      probeEvery,
		KeyState:        keyStateTold(ctx, h.logger, h.notifier),
		Spent:           spent,
		Served:          served,
		HeaderTimeout:   time.Duration(h.HeaderTimeout),
		IdleTimeout:     time.Duration(h.IdleTimeout),
		Retries:         *h.Retries,
		MaxWait:         time.Duration(h.MaxWait),
		UpstreamHeaders: h.UpstreamHeaders,
		SharedFor:       shared,
		Lockout:         time.Duration(h.UpstreamLockout),
		MaxDetached:     int64(*h.MaxDetached),
		PerCaller:       int64(h.MaxDetachedPerCaller),
		DetachedTimeout: time.Duration(h.DetachedTimeout),
		MaxAnswers:      h.MaxBuffered,
	}); err != nil {
		return fmt.Errorf("setting up the upstream: %w", err)
	}
	for _, name := range h.upstream.KeyNames() {
		metrics.keyUp.WithLabelValues(name).Set(1)
	}

	app, err := ctx.App("vigthoria")
	if err != nil {
		return err
	}
	app.(*App).register(h)
	return nil
}

// setDefaults gives every field the config leaves unset its default, and
// refuses the values of the fields that have a fixed set of them.
func (h *Handler) setDefaults() error {
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
	if h.MaxDetachedPerCaller == 0 {
		h.MaxDetachedPerCaller = proxy.DefaultDetachedPerCaller(*h.MaxDetached)
	}
	if h.DetachedTimeout == 0 {
		h.DetachedTimeout = caddy.Duration(proxy.DefaultDetachedTimeout)
	}
	if h.DefaultMaxTokens == 0 {
		h.DefaultMaxTokens = policy.DefaultMaxTokens
	}
	switch h.CapField {
	case "":
		h.CapField = wire.MaxCompletionTokensField
	case wire.MaxCompletionTokensField, wire.MaxTokensField:
	default:
		return fmt.Errorf("cap_field must be max_completion_tokens or max_tokens, not '%s'", h.CapField)
	}
	if h.Currency == "" {
		h.Currency = policy.DefaultCurrency
	}
	if h.Unpriced == "" {
		h.Unpriced = policy.UnpricedRefuse
	}
	if h.AuthFailLimit == 0 {
		h.AuthFailLimit = DefaultAuthFailLimit
	}
	if h.AuthFailWindow == 0 {
		h.AuthFailWindow = caddy.Duration(DefaultAuthFailWindow)
	}
	h.identityTier = h.IdentityTier
	if h.Identity != "" && h.IdentityTier == "" && len(h.Tiers) == 1 {
		for name := range h.Tiers {
			h.identityTier = name
		}
	}
	if h.Store == "" {
		h.Store = "sqlite:" + store.DefaultSQLitePath()
	}
	if h.MaxTokenTTL == 0 {
		h.MaxTokenTTL = caddy.Duration(DefaultMaxTokenTTL)
	}
	if h.StoreTimeout == 0 {
		h.StoreTimeout = caddy.Duration(DefaultStoreTimeout)
	}
	if h.Queue != nil {
		h.Queue.SetDefaults()
	}
	switch h.OnStoreError {
	case "", "local", "deny", "local_unshared":
	default:
		return fmt.Errorf("on_store_error must be local, deny or local_unshared, not '%s'", h.OnStoreError)
	}
	return nil
}

// provisionLimiter returns the limiter of the store of spec, of kind
// "sqlite" or "redis": in memory for the first, counting quotas from the
// ledger; shared through Redis for the second, with on_store_error's
// fallback. It outlives reloads (limiters).
func (h *Handler) provisionLimiter(spec, kind string) (pooledLimiter, error) {
	onError := limiter.UseLocal
	switch h.OnStoreError {
	case "deny":
		onError = limiter.Deny
	case "local_unshared":
		onError = limiter.UseLocalUnshared
	}
	h.limiterKey = "memory:" + spec
	if kind == "redis" {
		h.limiterKey = fmt.Sprintf("redis:%s:%d:%d", spec, onError, h.StoreTimeout)
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
			Limiter: newFallback(shared, onError, logger),
			shared:  shared,
			redis:   client,
			release: release,
		}, nil
	})
	if err != nil {
		return pooledLimiter{}, err
	}
	return lim.(pooledLimiter), nil
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
	if h.upstream != nil {
		h.upstream.Close()
	}
	ownErr := errors.Join(h.cleanupAlerts(), h.cleanupJWT())
	if h.queue != nil {
		h.queue.Stop()
	}
	if h.releaseTiers != nil {
		h.releaseTiers()
	}
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
	if err := h.validateAPIKeys(); err != nil {
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
	if err := h.policy.Validate(); err != nil {
		return err
	}
	if h.HeaderTimeout < 0 {
		return fmt.Errorf("header_timeout must be positive, not %s", time.Duration(h.HeaderTimeout))
	}
	if h.IdleTimeout < 0 {
		return fmt.Errorf("idle_timeout must be positive, not %s", time.Duration(h.IdleTimeout))
	}
	if h.anonymousTier != "" && h.Tiers[h.anonymousTier] == nil {
		return fmt.Errorf("anonymous tier '%s' is not configured", h.anonymousTier)
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
	if h.MaxTokenTTL < caddy.Duration(time.Second) || time.Duration(h.MaxTokenTTL) > keys.MaxTokenTTL {
		return fmt.Errorf("max_token_ttl must be between 1s and %s, not %s", keys.MaxTokenTTL, time.Duration(h.MaxTokenTTL))
	}
	if *h.Retries < 0 || h.MaxWait < 0 {
		return errors.New("retries and max_wait must be positive")
	}
	if h.UpstreamLockout < caddy.Duration(time.Second) {
		return fmt.Errorf("upstream_lockout must be at least 1s, not %s", time.Duration(h.UpstreamLockout))
	}
	if *h.MaxDetached < 0 || h.MaxDetachedPerCaller < 0 || h.DetachedTimeout < 0 {
		return errors.New("max_detached, max_detached_per_caller and detached_timeout must be positive")
	}
	if h.AuthFailLimit < 0 || h.AuthFailWindow < 0 {
		return errors.New("auth_fail_limit and auth_fail_window must be positive")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
