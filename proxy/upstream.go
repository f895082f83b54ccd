package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/vigthoria/caddy-vigthoria/api"
	"go.uber.org/zap"
)

// DefaultURL is the Vigthoria API's base URL.
const DefaultURL = "https://api.vigthoria.io/v1"

// Config describes the upstream side of the proxy.
type Config struct {
	// URL is the API's base URL, scheme http or https, with an optional
	// base path; /v1/chat/completions on the proxy goes to URL+"/chat/completions".
	URL string
	// APIKey is the resolved server key, sent as "Authorization: Bearer …":
	// a pool of one, when Keys is empty.
	APIKey string
	// Keys are the pool of server keys; each request goes to one of them
	// (see pool.pick).
	Keys []ServerKey
	// MatchModel reports whether a model glob of a key admits a model;
	// exact equality when nil.
	MatchModel func(glob, model string) bool
	// ProbeEvery is how often a key the upstream refused is probed with
	// GET <URL>/models; DefaultProbeEvery when zero.
	ProbeEvery time.Duration
	// KeyState, when set, is told of every key taken out of the pool or
	// returned to it.
	KeyState KeyState
	// Spent, when set, is told each time the upstream's answer newly
	// says that a server key as a whole is spent (a 429 about the key,
	// or none left of its count until a reset): the queue learns its
	// pace from it.
	Spent func(now time.Time)
	// Served, when set, is told of each 2xx answer of the upstream's, as
	// its headers come.
	Served func(now time.Time)
	// SharedFor, when set, gives each key's fleet-wide exhaustion by its
	// Fingerprint, in place of Shared.
	SharedFor func(fingerprint string) SharedExhaustion
	// HeaderTimeout bounds the wait for the upstream's response headers;
	// zero waits as long as the client does.
	HeaderTimeout time.Duration
	// IdleTimeout bounds the silence in an answer's body once its headers
	// came; zero waits as long as the client does.
	IdleTimeout time.Duration
	// Retries of an upstream 429, 502, 503 or failed connection, waiting
	// at most MaxWait in all.
	Retries int
	MaxWait time.Duration
	// UpstreamHeaders are request headers let through to the upstream
	// beyond the built-in allowlist (see upstreamHeader); New refuses
	// credentials, hop-by-hop headers and the like (CheckUpstreamHeaders).
	UpstreamHeaders []string
	// Shared, when set, shares the upstream's word on the key's exhaustion
	// with the other instances of a fleet.
	Shared SharedExhaustion
	// Lockout bounds how long the upstream's word alone (a spent count
	// until its reset, a 429's Retry-After) stops callers; DefaultLockout
	// when zero.
	Lockout time.Duration
	// MaxDetached bounds the calls of the process that go on after their
	// caller left (0: none does), PerCaller those of one caller (0: only
	// MaxDetached bounds them), DetachedTimeout how long each may.
	MaxDetached     int64
	PerCaller       int64
	DetachedTimeout time.Duration
	// MaxAnswers bounds the bytes that the answers of the process hold
	// in memory at once (see wire.Hold): a stream's event past it ends
	// the stream, a JSON answer past it passes unchecked, as it comes.
	MaxAnswers int64
}

// Upstream forwards admitted requests to the API through Caddy's own
// reverse_proxy handler, loaded through Caddy's module system so that Caddy
// provisions and cleans it up with the config that owns it.
type Upstream struct {
	tenant string // Fingerprint of the URL and server key: the upstream's answers differ by both
	host   string // the upstream's, for the Host of what goes there
	rp     *reverseproxy.Handler
	paths  [api.NumEndpoints]string // upstream path of each endpoint
	extra  map[string]bool          // request headers let through beyond upstreamHeader; nil for none
	// modelsHeaders are the request headers that may change the model
	// list: modelsShapers, then the extra ones in their configured order.
	modelsHeaders []string
	pool          *pool
	logger        *zap.Logger
	// stopProbes ends the prober of the keys out of the pool.
	stopProbes context.CancelFunc
	// cutDetached ends the calls detached by this upstream's transport.
	cutDetached context.CancelFunc
	// listed is the IDs of the model list fetched last, for metric labels.
	listed atomic.Pointer[map[string]struct{}]
}

// ParseURL checks an upstream base URL and returns it parsed.
func ParseURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("invalid upstream URL '%s': %v", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("invalid upstream URL '%s': scheme must be http or https", raw)
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("invalid upstream URL '%s': no host", raw)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("invalid upstream URL '%s': only scheme, host, port and path are allowed", raw)
	}
	return u, nil
}

// New loads and provisions the reverse proxy for cfg within ctx.
func New(ctx caddy.Context, cfg Config) (*Upstream, error) {
	u, err := ParseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	keys := cfg.Keys
	if len(keys) == 0 && cfg.APIKey != "" {
		keys = []ServerKey{{Key: cfg.APIKey}}
	}
	names, err := CheckUpstreamHeaders(cfg.UpstreamHeaders)
	if err != nil {
		return nil, err
	}
	var extra map[string]bool
	for _, name := range names {
		if extra == nil {
			extra = make(map[string]bool, len(names))
		}
		extra[name] = true
	}
	port := u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	hostport := net.JoinHostPort(u.Hostname(), port)

	transport := map[string]any{"protocol": "http"}
	if u.Scheme == "https" {
		transport["tls"] = map[string]any{"server_name": u.Hostname()}
	}
	// No response_header_timeout: the key transport times the headers
	// itself, so that a request the upstream received goes on when it
	// passes (timedRoundTrip).
	raw, err := json.Marshal(map[string]any{
		"upstreams": []map[string]string{{"dial": hostport}},
		// No flush_interval: Caddy already passes server-sent events on as
		// they come, and flushing every write of a JSON answer costs
		// throughput (measured by make bench).
		"transport": transport,
	})
	if err != nil {
		return nil, err
	}
	mod, err := ctx.LoadModuleByID("http.handlers.reverse_proxy", raw)
	if err != nil {
		return nil, fmt.Errorf("loading reverse_proxy: %v", err)
	}
	rp := mod.(*reverseproxy.Handler)

	up := &Upstream{host: u.Host, rp: rp, extra: extra, logger: ctx.Logger()}
	if up.pool, err = newPool(cfg.URL, keys, &cfg, up.logger); err != nil {
		return nil, err
	}
	up.tenant = up.pool.keys[0].tenant
	up.modelsHeaders = append(modelsShapers[:len(modelsShapers):len(modelsShapers)], names...)
	base := strings.TrimSuffix(u.Path, "/")
	for i := range api.Endpoints {
		up.paths[i] = base + api.Endpoints[i].Suffix
	}
	cut, cutDetached := context.WithCancel(context.Background())
	up.cutDetached = cutDetached
	// The key is added on the proxy's own copy of the request, as the last
	// step before it leaves, so it is in no request that Caddy logs.
	probes, stopProbes := context.WithCancel(context.Background())
	up.stopProbes = stopProbes
	// Probes go out on Caddy's own transport, with the key probed: not
	// through keyTransport, which would pick a key of the pool.
	direct := rp.Transport
	up.pool.checkWith(direct, u.Scheme+"://"+u.Host+base+"/models", u.Host)
	up.pool.startProber = func() { go up.pool.run(probes) }
	rp.Transport = &keyTransport{
		next:          rp.Transport,
		host:          u.Host,
		extra:         extra,
		retry:         retryPolicy{retries: cfg.Retries, maxWait: cfg.MaxWait},
		pool:          up.pool,
		idleTimeout:   cfg.IdleTimeout,
		headerTimeout: cfg.HeaderTimeout,
		detach:        DetachPolicy{Max: cfg.MaxDetached, PerCaller: cfg.PerCaller, Timeout: cfg.DetachedTimeout, cut: cut},
		maxAnswers:    cfg.MaxAnswers,
		served:        cfg.Served,
		logger:        up.logger,
	}
	return up, nil
}

// Forward sends r, already admitted for ep, to the upstream and streams the
// answer to w, counting what it used into c.Usage. A failure before
// anything was written comes back as an *APIError for the caller to
// write; a stream that fails once started is ended with an SSE error
// event.
func (up *Upstream) Forward(w http.ResponseWriter, r *http.Request, ep *api.Endpoint, next caddyhttp.Handler, c *Call) error {
	up.keepUpstreamHeaders(r.Header)
	// The caller's Host is no more the upstream's than its headers are
	// (the transport sets it again): a site that answers any name would
	// have reverse_proxy's debug line print whatever it was sent there.
	r.Host = up.host
	r.URL.Path = up.paths[ep.ID]
	r.URL.RawPath = ""
	r.URL.RawQuery = ""
	c.start = time.Now()
	// Set once and left: Caddy's dialer reads the variables from
	// goroutines that may outlive this call, so a later write would race.
	caddyhttp.SetVar(r.Context(), callVar, c)
	// reverse_proxy panics when the client left mid-answer; the call is
	// over either way, its body read to the end and closed, unless it
	// goes on after its caller was answered: it ends on its own then.
	defer func() {
		if c.late == nil {
			c.finish()
		}
	}()

	err := up.rp.ServeHTTP(w, r, next)
	if err == nil {
		return nil
	}
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) {
		return errUpstreamUnavailable
	}
	switch {
	case errors.Is(he.Err, errKeyRefused):
		return errUpstreamAuth
	case errors.Is(he.Err, errRequestRefused):
		return errUpstreamRefused
	case errors.Is(he.Err, errModelNotServed):
		return errModelNotAvailable
	case errors.Is(he.Err, errInterim):
		up.logger.Warn("upstream answered with an informational status; refused", zap.String("endpoint", ep.Name))
		return errUpstreamBadAnswer
	case errors.Is(he.Err, errBadAnswer):
		up.logger.Warn("upstream answered 2xx with a body that is not JSON", zap.String("endpoint", ep.Name))
		return errUpstreamBadAnswer
	case errors.Is(he.Err, errNotAnAnswer):
		return errUpstreamNotAnswer
	case errors.Is(he.Err, errHeaderTimeout), he.StatusCode == http.StatusGatewayTimeout:
		return errUpstreamTimeout
	case he.StatusCode == 499:
		return nil // the client left; nobody to answer
	}
	if c := up.logger.Check(zap.WarnLevel, "upstream request failed"); c != nil {
		c.Write(zap.String("endpoint", ep.Name), zap.Error(he.Err))
	}
	return errUpstreamUnavailable
}

// Exhausted reports whether a request may not go upstream at now, and
// for how long still: of the server keys as a whole when model is "",
// else of that model; exhausted only when no key of the pool that
// serves the model may take it, waiting until the soonest one opens. The upstream's word locks a scope for at most the
// lockout bound; past it, one request at a time is let through as a
// probe (with a shared store, one in the fleet), which may cost one
// exchange with the store. It is meant to be asked for the key before
// admission, and for the model once the body named it.
func (up *Upstream) Exhausted(ctx context.Context, model string, now time.Time) (time.Duration, bool, ProbeClaim) {
	return up.pool.exhaustedFor(ctx, model, now)
}

// KeyNames names the server keys of the pool, by their names or
// fingerprints.
func (up *Upstream) KeyNames() []string {
	names := make([]string, len(up.pool.keys))
	for i, k := range up.pool.keys {
		names[i] = k.name
	}
	return names
}

// Close stops the prober of the keys out of the pool.
func (up *Upstream) Close() {
	if up.stopProbes != nil {
		up.stopProbes()
	}
}

// keepUpstreamHeaders removes from the caller's request every header that
// may not go upstream, before reverse_proxy sees it: its debug log prints
// the request it forwards, and a credential in a header of another name
// must not be in it; nor one in a header that may go (a client key or a
// token in a User-Agent or a request ID), which is removed too. The
// transport applies the same allowlist again to what reverse_proxy adds.
func (up *Upstream) keepUpstreamHeaders(h http.Header) {
	for name, values := range h {
		if !upstreamHeader(name) && !up.extra[name] || credentialIn(values) {
			delete(h, name)
		}
	}
}

// credentialIn reports whether a value holds something shaped like a
// client key or a JWT.
func credentialIn(values []string) bool {
	for _, v := range values {
		if api.HasCredential(v) {
			return true
		}
	}
	return false
}

func isCredentialHeader(canonical string) bool {
	switch canonical {
	case "Authorization", "Proxy-Authorization", "Cookie":
		return true
	}
	// Api-Key, X-Api-Key, X-Goog-Api-Key and their kin.
	return strings.Contains(canonical, "Api-Key") || strings.Contains(canonical, "Apikey")
}
