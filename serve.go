package vigthoria

import (
	"cmp"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/vigthoria/caddy-vigthoria/admission"
	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// ServeHTTP runs the request through the pipeline: route, identify,
// admit, read and police the body, reserve its tokens, forward, settle.
// Nothing that needs no body waits for one: a caller is identified and its
// request and concurrency limits are applied before a byte of its body is
// read, so that what an unknown or over-limit caller costs is bounded.
// Every refusal is answered here in the API's error shape: the packages
// below decide, and only this file (and the proxy's own answers) write.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) (err error) {
	if line, lw, lr := h.redactedLine(w, r); line != nil {
		defer func() { line.write(lr, err, h.logger); err = nil }()
		w, r = lw, lr
	}
	x := exchange{h: h, w: w, r: r, now: time.Now(), endpoint: "unknown", tier: "none"}
	return x.serve(next)
}

// exchange is one request on its way through the handler: what each step
// learned, for the steps after it and for its answer.
type exchange struct {
	h        *Handler
	w        http.ResponseWriter
	r        *http.Request
	now      time.Time
	endpoint string // its metrics label: an endpoint's Name, "tokens", "jwks" or "unknown"
	tier     string // its caller's tier as a label; "none" before it is known

	client caller.Client
	policy *policy.Tier // everything the caller is decided by
	adm    admission.Admission

	call      *proxy.Call
	body      proxy.Body // an endpoint's with a body, once read
	info      wire.RequestInfo
	forwarded bool
	running   *ledger.Running    // a stream's usage, recorded as it goes
	queueWait time.Duration      // how long it waited for its turn (queue.go)
	probes    []proxy.ProbeClaim // the upstream's probes it was let through as (queue.go)
}

// serve is ServeHTTP's pipeline.
func (x *exchange) serve(next caddyhttp.Handler) error {
	h, w, r := x.h, x.w, x.r
	if h.cors(w, r) {
		return nil
	}
	p := routePath(r)
	if strings.HasPrefix(p, "/vigthoria/") {
		return x.serveOwn(p)
	}
	apiHeaders(w.Header())
	ep, apiErr := api.Route(r.Method, p)
	if apiErr != nil {
		return x.refuse(apiErr)
	}
	x.endpoint = ep.Name
	if ep.Body && !jsonContentType(r.Header) {
		return x.refuse(errUnsupportedMediaType)
	}
	if err := h.start(); err != nil {
		h.logger.Error("the key store is unavailable", zap.Error(err))
		return x.refuse(admission.ErrUnavailable)
	}
	client, tier, verdict, apiErr := x.identify()
	if apiErr != nil {
		if client.ID != "" { // known, but of a tier not configured
			x.client, x.tier = client, h.tierLabel(client.Tier)
			return x.refuseClient(apiErr)
		}
		return x.refuse(apiErr)
	}
	x.client, x.tier, x.policy = client, client.Tier, tier
	if !tier.AllowsOrigin(r.Header.Get("Origin")) {
		return x.refuseClient(errKeyOriginNotAllowed)
	}
	if verdict.Ambient() {
		if crossSite(r, h.CORS) {
			return x.refuseClient(errCrossSite)
		}
		if !h.namesChecked.Load() {
			x.checkSiteNames()
		}
	}

	// The key's exhaustion first, before anything is counted; a model's
	// once the body names it. A queue waits the key's out in its order,
	// after the body.
	cached := ep.ID == api.Models && h.ModelsCache > 0
	defer x.releaseProbes()
	if !cached && ep.ID != api.Usage && !(ep.Body && h.queue.Gates()) {
		if wait, exhausted := x.upstreamExhausted(""); exhausted {
			return x.refuseClient(api.UpstreamExhausted("", api.RetrySeconds(wait)))
		}
	}

	// Counted from its admission on: Cleanup waits for it before the
	// limiter closes.
	h.active.Add(1)
	defer h.active.Add(-1)
	var f *admission.Refusal
	if x.adm, f = h.admitter.Admit(r.Context(), client, tier, policy.LimitSetOf(ep.ID), x.now); f != nil {
		if f = x.waitOwn(policy.LimitSetOf(ep.ID), f); f != nil {
			return x.refuseDecided(f)
		}
	}
	if ep.ID == api.Usage {
		// Counted as a request, then settled before the report reads
		// the standing, which would otherwise count it in flight.
		h.admitter.Settle(r.Context(), &x.adm, ledger.Tokens{})
		requestsBy.get([3]string{client.Tier, ep.Name, "ok"}).Inc()
		return x.serveUsage()
	}

	// Admitted: every way out from here settles, a panic included. A
	// request refused before it was forwarded frees its slot and is
	// charged nothing; a forwarded one is charged what it used.
	x.call = &proxy.Call{Caller: client.ID}
	defer x.end(ep)
	if ep.Body {
		if x.body, apiErr = proxy.ReadBody(w, r, &h.bodyLimits, proxy.Holder{Share: tier.Bodies(), Caller: client.ID}); apiErr != nil {
			return x.refuseAdmitted(apiErr)
		}
		if refused, err := x.policeAndReserve(ep, &x.body); refused {
			return err
		}
	}
	// The limits it was admitted under: the standing of those it was not
	// checked against is not known here.
	limiter.SetHeaders(w.Header(), x.adm.Limits(), x.adm.State, x.now)
	x.noteQueueWait(w.Header())
	return x.forward(ep, cached, next)
}

// policeAndReserve applies the caller's policy to a request's body and
// reserves what it may cost; when it refused the request, its refusal is
// answered and err is ServeHTTP's.
func (x *exchange) policeAndReserve(ep *api.Endpoint, body *proxy.Body) (refused bool, err error) {
	h, r := x.h, x.r
	info, reserve, apiErr := h.policy.Police(r, ep, x.policy, body.Bytes(), x.call)
	x.info = info
	if apiErr != nil {
		if apiErr.Code == api.CodeRequestTooLarge {
			// No wait admits it: SDKs retry a 429 unless told not to.
			e := *apiErr
			e.NoRetry = true
			apiErr = &e
		}
		return true, x.refuseAdmitted(apiErr)
	}
	x.call.Model = info.Model
	if wait, exhausted := x.upstreamExhausted(info.Model); exhausted {
		return true, x.refuseAdmitted(api.UpstreamExhausted(info.Model, api.RetrySeconds(wait)))
	}
	if f := h.admitter.Reserve(r.Context(), &x.adm, info.Model, info.PromptTokens, reserve, x.now); f != nil {
		return true, x.refuseDecided(f)
	}
	// Last, holding what it reserved: the upstream's capacity, in turn.
	if f := x.waitUpstream(body); f != nil {
		return true, x.refuseDecided(f)
	}
	return false, nil
}

// forward sends an admitted request upstream, or answers GET /v1/models
// from the cache, and answers with what came back.
func (x *exchange) forward(ep *api.Endpoint, cached bool, next caddyhttp.Handler) error {
	h, w, r := x.h, x.w, x.r
	if x.info.Stream {
		metrics.activeStreams.Inc()
		defer metrics.activeStreams.Dec()
	}
	x.forwarded = true
	if x.info.Stream {
		// After forwarded: the settle that finishes it is sure to run.
		x.running = x.recordStream()
	}
	var err error
	if cached {
		err = h.upstream.ServeModels(w, r, next, time.Duration(h.ModelsCache), x.policy.ModelFilter(), x.call)
	} else {
		err = h.upstream.Forward(w, r, ep, next, x.call)
	}
	if err == nil {
		return nil
	}
	// A variable of its own: taking apiErr's address would move it to
	// the heap on every request.
	var answer *api.Error
	if errors.As(err, &answer) {
		answer.Write(w)
		return nil
	}
	return err
}

// end ends an admitted request on every way out: it is settled and its
// body let go, now, or, when its call goes on after its caller was
// answered (504 at header_timeout, or its stream's end at idle_timeout),
// once that call is over (it may still replay the body on a retry, and
// what it used is known only then). Until then it counts as active, so
// that Cleanup waits for it. The caller's answer is counted and logged
// now, as it went.
func (x *exchange) end(ep *api.Endpoint) {
	x.r.Body = http.NoBody // it replays storage that goes back to the pool
	if x.call.GoesOn() {
		x.countOutcome(admittedLog{tier: x.client.Tier, outcome: outcome(x.call.AnsweredWith()), model: x.info.Model, queueWait: x.queueWait})
		x.h.active.Add(1)
		x.call.WhenOver(func() {
			defer x.h.active.Add(-1)
			x.settle(ep)
			x.body.Release()
		})
		return
	}
	x.settle(ep)
	x.body.Release()
}

// settle ends an admitted request on every way out: one refused before it
// was forwarded frees what it took and is charged nothing; a forwarded
// one is charged what it used, in the ledger first: a limiter that
// forgets an account once it is settled reads its quota back from the
// ledger, which must then hold this request; and a usage report that
// shows it no longer in flight must count it (serveUsage).
func (x *exchange) settle(ep *api.Endpoint) {
	h, client := x.h, x.client
	ad, ctx := h.admitter, x.r.Context()
	if !x.forwarded {
		ad.Settle(ctx, &x.adm, ledger.Tokens{})
		ad.NoteStanding(&x.adm, ledger.Tokens{})
		if h.queue != nil {
			h.queue.Released(client.ID)
		}
		return
	}
	usage := &x.call.Usage
	used, pastCap := ad.ChargeFor(client.ID, x.info.Model, usage, x.adm.Lease.Reserved, int64(len(x.call.Body)))
	if pastCap > 0 {
		pastCapBy.get(client.Tier).Inc()
	}
	end := time.Now()
	recorded := (usage.Status != 0 || used.Total() > 0) && ep.ID != api.Models
	model := ledgerModel(x.info.Model, usage.Status)
	ledger := h.keys.Ledger()
	switch {
	case x.running != nil:
		ledger.Finish(x.running, model, end, used, recorded)
	case recorded:
		ledger.Add(client.ID, model, end, used)
		if client.Minted != nil {
			// The minting key's rows hold its users' usage: its quota
			// counts from them after a restart.
			ledger.Add(client.Minted.KeyID, model, end, used)
		}
	}
	ad.Settle(ctx, &x.adm, used)
	ad.NoteStanding(&x.adm, used)
	if h.queue != nil {
		h.queue.Released(client.ID)
	}
	x.record(usage, used.Prompt, used.Completion)
}

// recordStream has the ledger record a stream's usage as it goes, once a
// second (keys.Running): its prompt's estimate and the output it
// carried so far, from its first delta on, as a stream cut short is
// charged (see admission.Charge). The meter reads one atomic counter.
func (x *exchange) recordStream() *ledger.Running {
	call, client := x.call, x.client
	prompt := min(cmp.Or(call.Usage.Prompt, wire.PromptEstimate(int64(len(call.Body)))), x.adm.Lease.Reserved)
	p, priced := x.h.policy.Price(x.info.Model)
	var also string
	if client.Minted != nil {
		also = client.Minted.KeyID
	}
	return x.h.keys.Ledger().Begin(client.ID, also, x.info.Model, func() ledger.Tokens {
		streamed := call.Streamed()
		if streamed == 0 {
			return ledger.Tokens{}
		}
		t := ledger.Tokens{Prompt: prompt, Completion: streamed}
		if priced {
			t.Cost = p.Cost(t.Prompt, t.Completion)
		}
		return t
	})
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
func (x *exchange) refuse(e *api.Error) error {
	refusalsBy.get([3]string{x.tier, x.endpoint, e.Code}).Inc()
	if extra := logFields(x.r); extra != nil {
		extra.Add(zap.Inline(refusedLog{tier: x.tier, reason: e.Code}))
	}
	e.Write(x.w)
	return nil
}

// refuseClient answers the refusal of an identified caller's request as
// refuse does, and counts it, by its reason, in the ledger's hourly rows
// of the caller, for the dashboard.
func (x *exchange) refuseClient(e *api.Error) error {
	if err := x.h.keys.Ledger().Refuse(x.client.ID, e.Code, x.now); err != nil {
		x.h.logger.Error("counting a refusal", zap.String("client_id", x.client.ID), zap.Error(err))
	}
	return x.refuse(e)
}

// refuseAdmitted answers an admitted request refused before it was
// forwarded, with the caller's standing, which counts it.
func (x *exchange) refuseAdmitted(e *api.Error) error {
	limiter.SetHeaders(x.w.Header(), x.policy.Limits(), x.adm.State, x.now)
	return x.refuseClient(e)
}

// refuseDecided answers admission's refusal with the limit headers it
// names.
func (x *exchange) refuseDecided(f *admission.Refusal) error {
	h := x.w.Header()
	if f.Standing != nil {
		limiter.SetHeaders(h, f.Standing, f.State, x.now)
	}
	if f.Refused != nil {
		limiter.SetRefusalHeaders(h, f.Refused, f.Decision, x.now)
	}
	return x.refuseClient(f.Err)
}

// record counts an admitted request's usage in the metrics, and its
// outcome with it in the metrics and the access log, unless its caller
// was answered before its call was over: that answer was counted then,
// and its line written; what it used is logged on its own.
func (x *exchange) record(u *proxy.AnswerUsage, prompt, completion int64) {
	tier, model := x.client.Tier, x.info.Model
	if prompt+completion > 0 {
		tokens := tokensBy.get([2]string{tier, x.h.modelLabel(model)})
		tokens[0].Add(float64(prompt))
		tokens[1].Add(float64(completion))
	}
	if u.HeaderLatency > 0 {
		latencyBy.get(x.endpoint).Observe(u.HeaderLatency.Seconds())
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
	if x.call.GoesOn() {
		x.h.logger.Info("a call that went on after its caller was answered (header_timeout, idle_timeout) ended, and is charged what it used",
			zap.String("client_id", x.client.ID), zap.String("model", model), zap.Int("upstream_status", u.Status),
			zap.Int64("prompt_tokens", prompt), zap.Int64("completion_tokens", completion))
		return
	}
	result := outcome(u.Status)
	if u.Cache == "HIT" || u.Cache == "STALE" {
		result = "cached"
	}
	x.countOutcome(admittedLog{tier: tier, outcome: result, model: model, cache: u.Cache,
		prompt: prompt, completion: completion, retries: u.Retries, queueWait: x.queueWait})
}

// countOutcome counts an admitted request's answer in the metrics and
// the access log.
func (x *exchange) countOutcome(l admittedLog) {
	requestsBy.get([3]string{l.tier, x.endpoint, l.outcome}).Inc()
	if extra := logFields(x.r); extra != nil {
		extra.Add(zap.Inline(&l))
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
	queueWait                   time.Duration
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
	if l.queueWait > 0 {
		enc.AddInt64("vigthoria_queue_wait_ms", l.queueWait.Milliseconds())
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
