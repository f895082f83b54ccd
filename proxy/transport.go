package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/http/httpguts"

	"github.com/vigthoria/caddy-vigthoria/internal/pause"
)

// errKeyRefused is the upstream refusing the server key (401/403): a fault
// of the operator's configuration that no client can fix or should see.
var errKeyRefused = errors.New("upstream refused the server key")

// errRequestRefused is the upstream refusing one request (401/403) with
// every server key that serves it, though each works.
var errRequestRefused = errors.New("upstream refused the request with server keys that work")

// keyTransport wraps the reverse proxy's transport: it gives the outgoing
// request the server key and the upstream's Host, and guards the answer.
type keyTransport struct {
	next        http.RoundTripper
	host        string
	extra       map[string]bool // request headers let through beyond upstreamHeader; nil for none
	retry       retryPolicy
	pool        *pool         // the server keys; each attempt picks one
	idleTimeout time.Duration // longest silence in a body after its headers; 0: none
	// headerTimeout bounds each attempt's wait for its answer's headers;
	// 0: none.
	headerTimeout time.Duration
	detach        DetachPolicy // what a call whose caller left may still do
	// maxAnswers bounds the bytes the answers of the process hold at
	// once (wire.Hold): streams' buffers, JSON answers read whole.
	maxAnswers int64
	served     func(now time.Time) // told of each 2xx answer; nil for none
	logger     *zap.Logger
}

// RoundTrip implements http.RoundTripper. It leaves req untouched, as the
// contract asks: Caddy logs req, and the key must never be in it.
func (t *keyTransport) RoundTrip(req *http.Request) (_ *http.Response, err error) {
	ctx, cancel := req.Context(), context.CancelCauseFunc(nil)
	c := callFrom(req.Context())
	trace := interimTrace
	if c != nil {
		trace = c.traceUpstream()
	}
	switch {
	case c != nil && c.Usage.caller != nil:
		// A request the upstream may bill: it does not end with its
		// caller, but as the call's watch decides (detach.go), which is
		// its context.
		ctx = c.upstreamContext(ctx, trace, &t.detach)
		defer func() { err = c.watch.causeOf(err) }()
		if t.idleTimeout > 0 || t.headerTimeout > 0 {
			cancel = c.watch.end
		}
	case t.idleTimeout > 0 || t.headerTimeout > 0:
		ctx, cancel = context.WithCancelCause(ctx)
		ctx = tracedContext{ctx, trace}
	default:
		ctx = tracedContext{ctx, trace}
	}
	out := req.WithContext(ctx)
	out.Header = headerPool.Get().(http.Header)
	for name, values := range req.Header {
		if upstreamHeader(name) || t.extra[name] {
			out.Header[name] = values
		}
	}
	out.Host = t.host

	if t.headerTimeout == 0 {
		res, err := t.roundTrip(out, c, nil)
		return t.answer(req, out, c, cancel, res, err)
	}
	sent := t.timedRoundTrip(out, c, cancel)
	if sent.goesOn {
		go t.goOn(req, out, c, cancel, sent.done)
		return nil, errHeaderTimeout
	}
	return t.answer(req, out, c, cancel, sent.res, sent.err)
}

// answer guards what the upstream answered to out, sent for req: the
// headers that may reach the caller, a status or type that is no answer,
// a stream's events and a JSON answer's body, counting its usage into c.
// cancel, when set, ends the upstream request.
func (t *keyTransport) answer(req, out *http.Request, c *Call, cancel context.CancelCauseFunc, res *http.Response, err error) (*http.Response, error) {
	if c != nil {
		c.Usage.HeaderLatency = time.Since(c.start)
	}
	if err != nil {
		if cancel != nil {
			cancel(nil)
		}
		return nil, err
	}
	switch {
	case t.idleTimeout == 0, c != nil && c.GoesOn():
		// One that goes on after its caller was answered (goOn) is
		// bounded by detached's timeout alone: the upstream is slow.
	case c != nil && c.Usage.caller != nil && res.StatusCode < 300 && isEventStream(res.Header.Get("Content-Type")):
		// A stream the upstream may bill: it goes on past a silence.
		res.Body = newIdleStream(req.Context(), res.Body, c, t.idleTimeout, t.maxAnswers)
	default:
		res.Body = newIdleBody(res.Body, cancel, t.idleTimeout)
	}
	if res.StatusCode < 200 {
		// 101: a protocol switch nobody asked for (the upgrade headers
		// never go upstream), with a connection the proxy will not hold.
		res.Body.Close()
		return nil, errInterim
	}
	for name := range res.Header {
		if !downstreamHeader(name) {
			delete(res.Header, name)
		}
	}
	if c != nil {
		c.Usage.Status = res.StatusCode
	}
	ct := res.Header.Get("Content-Type")
	switch {
	case res.StatusCode >= 400:
		res.Body = errorAnswer(res, t.pool.names, t.logger)
	case res.StatusCode >= 300 || !answerType(ct, c):
		// A redirect (never followed: it would take the server key or
		// the caller elsewhere), or an answer of another type than the
		// API's (a captive portal's page, a CDN's, an HTML error): not
		// an answer, and not billed as one.
		discard(res)
		if c != nil {
			c.Usage.Status = http.StatusBadGateway
		}
		if ce := t.logger.Check(zap.WarnLevel, "upstream answered with something other than the API's JSON or event stream; refused"); ce != nil {
			ce.Write(zap.Int("upstream_status", res.StatusCode), zap.String("content_type", ct))
		}
		return nil, errNotAnAnswer
	case isEventStream(ct):
		res.Body = newSSEBody(req.Context(), res.Body, t.logger, c, t.maxAnswers)
	case c != nil:
		body, err := readAnswer(res, &c.Usage, &c.answer, t.maxAnswers)
		if err != nil {
			c.Usage.Status = 0 // nothing usable was answered
			return nil, err
		}
		res.Body = body
		if _, whole := body.(*checkedAnswer); whole {
			// The upstream's body is read and closed: the transport is
			// done with out, and its header map can serve another.
			clear(out.Header)
			headerPool.Put(out.Header)
		}
	}
	return res, nil
}

// answerType reports whether a 2xx answer's Content-Type is what c asked
// for: text/event-stream for a stream, application/json for anything
// else; either when there is no call to tell.
func answerType(contentType string, c *Call) bool {
	switch {
	case c == nil:
		return isEventStream(contentType) || isJSON(contentType)
	case c.Usage.Stream:
		return isEventStream(contentType)
	}
	return isJSON(contentType)
}

// headerPool recycles the header maps of the requests that go upstream.
// Each needs a map of its own, not Caddy's, so that the server key is in
// no request Caddy logs.
var headerPool = sync.Pool{New: func() any { return make(http.Header, 16) }}

// roundTrip sends out, and again after an upstream 502, 503, a transient
// 429 or a failed connection, as the retry policy allows: never past its
// max_wait in all, and only with a body it can replay. Every answer's
// evidence that the key or the model is spent, or no longer is, is noted.
// clock, when set, times each attempt's wait for its headers.
func (t *keyTransport) roundTrip(out *http.Request, c *Call, clock *headerClock) (*http.Response, error) {
	ctx := out.Context()
	var body []byte
	var model string
	if c != nil {
		body, model = c.Body, c.Model
	}
	replayable := out.Body == nil || out.Body == http.NoBody || body != nil
	var waited time.Duration
	var tried []*poolKey // the keys that refused the request, though they work
	for attempt := 0; ; attempt++ {
		sent := time.Now()
		k, err := t.keyFor(c, model, sent, tried)
		if err != nil {
			return nil, err
		}
		out.Header["Authorization"] = k.authorization
		if body != nil {
			out.Body = io.NopCloser(bytes.NewReader(body))
			out.ContentLength = int64(len(body))
		}
		clock.arm()
		res, err := t.next.RoundTrip(out)
		clock.stop()
		if err == nil && (res.StatusCode == http.StatusUnauthorized || res.StatusCode == http.StatusForbidden) {
			// Nothing of this body may reach the client. A key that still
			// works refused the request alone (a model its project may not
			// use): it stays in the pool. Else the key is out of the
			// pool. Either way the request goes at once to another key,
			// not counted as a retry: nothing reached the caller.
			discard(res)
			refused := errKeyRefused
			if t.pool.works(ctx, k) {
				tried, refused = append(tried, k), errRequestRefused
			} else {
				t.pool.refused(k, res.StatusCode)
			}
			if c != nil && c.key != nil || !replayable || ctx.Err() != nil {
				return nil, refused
			}
			if c != nil {
				c.Usage.MarkSent(false) // that attempt billed nothing
			}
			attempt--
			continue
		}
		var wait time.Duration
		hold := false // the queue holds the retry (Call.Hold)
		// Nobody is there to wait for a retry once the caller left, or
		// was answered early: the attempt that was answered billed nothing.
		again := attempt < t.retry.retries && replayable && (c == nil || !c.Usage.CallerLeft() && !c.Usage.AnsweredEarly())
		if err != nil {
			again = again && connectFailed(err)
			wait = jitter(attempt)
		} else {
			now := time.Now()
			word := readLimitWord(res, now)
			k.exhausted.heard(word, model, res.StatusCode, sent, now)
			if res.StatusCode >= 200 && res.StatusCode < 300 && t.served != nil {
				t.served(now)
			}
			if len(t.pool.keys) > 1 {
				k.learn(res.Header, now)
			}
			if res.StatusCode == http.StatusTooManyRequests {
				wait = word.wait
				switch spent := !word.keyUntil.IsZero(); {
				case spent && t.pool.openFor(model, now):
					wait = 0 // another key of the pool takes it now
				case spent && !word.quota && c != nil && c.Hold != nil:
					hold, wait = true, 0 // the queue decides how long
				default:
					again = again && word.retryable429(t.retry.maxWait-waited)
				}
			} else if again = again && retryable(res.StatusCode); again {
				wait = backoff(attempt, res)
			}
		}
		if !again || waited+wait > t.retry.maxWait {
			return res, err
		}
		if hold {
			// The queue holds it with its other waiters, in their order
			// and at the pace it learned: retried on its own after the
			// 429's wait, it would rush in with every other such retry
			// at the reset, and spend the key again.
			res.Body = buffered429(res)
			if !c.Hold(ctx) {
				return res, nil
			}
			wait = 0
		}
		if res != nil {
			discard(res)
		}
		if c != nil {
			c.Usage.Retries++
			c.Usage.MarkSent(false) // that attempt was answered, and billed nothing
		}
		if !pause.For(ctx, wait) {
			return nil, ctx.Err()
		}
		waited += wait
	}
}

// buffered429 reads a 429's body (its start: it is the API's short error)
// so that its connection is free while the request waits, and returns
// it to be read again when the 429 is the answer after all.
func buffered429(res *http.Response) io.ReadCloser {
	b, _ := io.ReadAll(io.LimitReader(res.Body, maxErrorPeek))
	res.Body.Close()
	return io.NopCloser(bytes.NewReader(b))
}

// keyFor is the server key of an attempt of c at now: the one c was
// pinned to, else the pool's pick for its model, but those tried.
func (t *keyTransport) keyFor(c *Call, model string, now time.Time, tried []*poolKey) (*poolKey, error) {
	if c != nil && c.key != nil {
		return c.key, nil
	}
	return t.pool.pickBut(model, now, tried)
}

// upstreamHeader reports whether a request header (canonical name) goes
// upstream. It is an allowlist: the upstream has one client, this proxy,
// and gets from the caller only what shapes the answer or traces it:
//
//   - content negotiation: Accept, Accept-Language, Content-Type (Go sets
//     Content-Length and Transfer-Encoding from the body itself);
//   - User-Agent, and the official SDKs' X-Stainless-* (language, version,
//     OS, retry count, timeout);
//   - request IDs: X-Request-Id, X-Client-Request-Id, and W3C trace
//     context (Traceparent, Tracestate);
//   - Idempotency-Key, so the upstream can tell a retry from a new request;
//   - OpenAI-Beta, which opts in to beta behaviour of an endpoint.
//
// Everything else stays here: credentials of any spelling (Authorization,
// Cookie, X-Auth-Token, X-Amz-Security-Token, …), the caller's addresses
// (X-Forwarded-*, Forwarded, X-Real-Ip, True-Client-Ip), organisation
// selectors (OpenAI-Organization, OpenAI-Project would bill another
// organisation with the server key), method and URL overrides
// (X-HTTP-Method-Override, X-Original-URL, X-Rewrite-URL), hop-by-hop and
// upgrade headers (Connection, Upgrade: nothing is ever upgraded), and
// Accept-Encoding, so that the answer arrives as text the proxy can read
// (the transport still negotiates compression on the upstream link). The
// operator lets more through with upstream_headers. It runs for every
// header of every request: a switch, no allocation.
func upstreamHeader(canonical string) bool {
	switch canonical {
	case "Accept", "Accept-Language", "Content-Type", "User-Agent",
		"X-Request-Id", "X-Client-Request-Id", "Traceparent", "Tracestate",
		"Idempotency-Key", "Openai-Beta":
		return true
	}
	return strings.HasPrefix(canonical, "X-Stainless-")
}

// downstreamHeader reports whether an upstream response header (canonical
// name) reaches the caller. It is an allowlist too, so that no cookie, no
// identifier of the upstream account (OpenAI-Organization, OpenAI-Project,
// and whatever an upstream adds tomorrow), nothing about the upstream's
// own host (Strict-Transport-Security, Alt-Svc, Server) and none of its
// caching headers (Cache-Control, Expires, Vary, ETag, Last-Modified,
// Age: API answers are the proxy's, Cache-Control: no-store, and the
// models cache sets its own) crosses: the answer's content headers, the
// retry hints the SDKs read (Retry-After, Retry-After-Ms,
// X-Should-Retry), the request ID and timing (X-Request-Id,
// OpenAI-Processing-Ms, OpenAI-Version), and the upstream's own
// X-RateLimit-Limit/Remaining/Reset. The caller's own limit headers and
// CORS headers are the proxy's, set after this.
func downstreamHeader(canonical string) bool {
	switch canonical {
	case "Content-Type", "Content-Length", "Content-Encoding", "Content-Language", "Date",
		"Retry-After", "Retry-After-Ms", "X-Should-Retry",
		"X-Request-Id", "Openai-Processing-Ms", "Openai-Version",
		"X-Ratelimit-Limit", "X-Ratelimit-Remaining", "X-Ratelimit-Reset":
		return true
	}
	return false
}

// CheckUpstreamHeaders checks the request headers an operator lets through
// beyond the allowlist and returns their canonical names. Credentials,
// hop-by-hop and upgrade headers, the caller's addresses, organisation
// selectors and the headers the transport sets itself are refused: no
// configuration may send them upstream.
func CheckUpstreamHeaders(names []string) ([]string, error) {
	out := make([]string, 0, len(names))
	for _, name := range names {
		if !httpguts.ValidHeaderFieldName(name) {
			return nil, fmt.Errorf("upstream_headers: '%s' is not a header name", name)
		}
		c := http.CanonicalHeaderKey(name)
		if reason := refusedUpstream(c); reason != "" {
			return nil, fmt.Errorf("upstream_headers: '%s' may never go upstream: %s", name, reason)
		}
		out = append(out, c)
	}
	return out, nil
}

// refusedUpstream says why a header may not be configured to go upstream,
// "" when it may.
func refusedUpstream(canonical string) string {
	lower := strings.ToLower(canonical)
	switch canonical {
	case "Host", "Connection", "Upgrade", "Keep-Alive", "Proxy-Connection", "Te", "Trailer",
		"Transfer-Encoding", "Content-Length", "Expect", "Http2-Settings":
		return "the transport's own (hop-by-hop, framing or upgrade)"
	case "Forwarded", "Via", "X-Real-Ip", "True-Client-Ip", "Cf-Connecting-Ip", "X-Client-Ip":
		return "it carries the caller's address"
	case "Openai-Organization", "Openai-Project":
		return "it would bill another organisation with the server key"
	case "Accept-Encoding":
		return "the proxy must read the answer"
	case "X-Http-Method-Override", "X-Http-Method", "X-Method-Override", "X-Original-Url", "X-Rewrite-Url":
		return "it overrides the method or URL the proxy checked"
	}
	switch {
	case strings.HasPrefix(canonical, "X-Forwarded-"):
		return "it carries the caller's address"
	case strings.HasPrefix(canonical, "Sec-Websocket-"):
		return "the transport's own (hop-by-hop, framing or upgrade)"
	case isCredentialHeader(canonical):
		return "it carries credentials"
	}
	for _, word := range [...]string{"auth", "token", "secret", "password", "cookie", "session", "key", "credential", "signature"} {
		if strings.Contains(lower, word) && canonical != "Idempotency-Key" {
			return "it may carry credentials"
		}
	}
	return ""
}

// errInterim is an upstream answering with a 1xx other than 100 Continue:
// an early hint whose headers would bypass the response allowlist, or a
// protocol switch. The caller gets a 502, and its request ends.
var errInterim = errors.New("upstream answered with an informational status other than 100 Continue")

// refuseInterim refuses every 1xx but 100, ending the round trip.
func refuseInterim(code int, _ textproto.MIMEHeader) error {
	if code == http.StatusContinue {
		return nil
	}
	return errInterim
}

// interimTrace is the client trace of a request going upstream without a
// call to count into.
var interimTrace = httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{Got1xxResponse: refuseInterim})

// tracedContext is the context of a request going upstream: its client
// trace is the proxy's alone, the one trace carries. Caddy's reverse_proxy
// traces 1xx answers to pass them on to the client, headers and all;
// composing another trace would not stop that, so this one replaces it.
type tracedContext struct {
	context.Context
	trace context.Context
}

func (c tracedContext) Value(key any) any {
	if v := c.trace.Value(key); v != nil {
		return v
	}
	return c.Context.Value(key)
}

// isEventStream reports whether a Content-Type is text/event-stream, with
// or without parameters.
func isEventStream(contentType string) bool { return isMediaType(contentType, "text/event-stream") }

// isJSON reports whether a Content-Type is application/json, with or
// without parameters.
func isJSON(contentType string) bool { return isMediaType(contentType, "application/json") }

// isMediaType reports whether contentType is the media type mt (lower
// case), with or without parameters. It runs on every answer, so it
// compares instead of parsing.
func isMediaType(contentType, mt string) bool {
	if len(contentType) < len(mt) || !strings.EqualFold(contentType[:len(mt)], mt) {
		return false
	}
	rest := strings.TrimLeft(contentType[len(mt):], " \t")
	return rest == "" || rest[0] == ';'
}
