package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// errKeyRefused is the upstream refusing the server key (401/403): a fault
// of the operator's configuration that no client can fix or should see.
var errKeyRefused = errors.New("upstream refused the server key")

// keyTransport wraps the reverse proxy's transport: it gives the outgoing
// request the server key and the upstream's Host, and guards the answer.
type keyTransport struct {
	next          http.RoundTripper
	authorization []string // "Bearer <server key>", shared and never mutated
	host          string
	drop          []string // response headers the proxy sets itself
	retry         retryPolicy
	exhausted     *exhaustion
	idleTimeout   time.Duration // longest silence in a body after its headers; 0: none
	logger        *zap.Logger
}

// RoundTrip implements http.RoundTripper. It leaves req untouched, as the
// contract asks: Caddy logs req, and the key must never be in it.
func (t *keyTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx, cancel := req.Context(), context.CancelCauseFunc(nil)
	if t.idleTimeout > 0 {
		ctx, cancel = context.WithCancelCause(ctx)
	}
	out := req.WithContext(ctx)
	out.Header = headerPool.Get().(http.Header)
	for name, values := range req.Header {
		if !isDroppedUpstream(name) {
			out.Header[name] = values
		}
	}
	out.Header["Authorization"] = t.authorization
	out.Host = t.host

	c := callFrom(req.Context())
	res, err := t.roundTrip(out, c)
	if c != nil {
		c.Usage.HeaderLatency = time.Since(c.start)
	}
	if err != nil {
		if cancel != nil {
			cancel(nil)
		}
		return nil, err
	}
	if cancel != nil {
		res.Body = newIdleBody(res.Body, ctx, cancel, t.idleTimeout)
	}
	if res.StatusCode == http.StatusUnauthorized || res.StatusCode == http.StatusForbidden {
		// Nothing of this body may reach the client.
		discard(res)
		t.logger.Error("upstream refused the server key; check api_key",
			zap.Int("upstream_status", res.StatusCode))
		return nil, errKeyRefused
	}
	for _, name := range t.drop {
		delete(res.Header, name)
	}
	if c != nil {
		c.Usage.Status = res.StatusCode
	}
	switch ct := res.Header.Get("Content-Type"); {
	case isEventStream(ct):
		res.Body = newSSEBody(req.Context(), res.Body, t.logger, c)
	case c != nil && res.StatusCode < 300:
		body, err := readAnswer(res, &c.Usage, &c.answer)
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

// headerPool recycles the header maps of the requests that go upstream.
// Each needs a map of its own, not Caddy's, so that the server key is in
// no request Caddy logs.
var headerPool = sync.Pool{New: func() any { return make(http.Header, 16) }}

// roundTrip sends out, and again after an upstream 429, 502, 503 or a
// failed connection, as the retry policy allows: never past its max_wait
// in all, and only with a body it can replay. Every answer's word on the
// key's exhaustion is noted.
func (t *keyTransport) roundTrip(out *http.Request, c *Call) (*http.Response, error) {
	ctx := out.Context()
	var body []byte
	if c != nil {
		body = c.Body
	}
	replayable := out.Body == nil || out.Body == http.NoBody || body != nil
	var waited time.Duration
	for attempt := 0; ; attempt++ {
		if body != nil {
			out.Body = io.NopCloser(bytes.NewReader(body))
			out.ContentLength = int64(len(body))
		}
		res, err := t.next.RoundTrip(out)
		if res != nil {
			t.exhausted.note(res, time.Now())
		}
		again := attempt < t.retry.retries && replayable &&
			((err != nil && connectFailed(err)) || (err == nil && retryable(res.StatusCode)))
		if !again {
			return res, err
		}
		wait := backoff(attempt, res)
		if waited+wait > t.retry.maxWait {
			return res, err
		}
		if res != nil {
			discard(res)
		}
		if c != nil {
			c.Usage.Retries++
		}
		if !sleepCtx(ctx, wait) {
			return nil, ctx.Err()
		}
		waited += wait
	}
}

// isDroppedUpstream names headers the upstream must not get: anything
// credential-like, forwarding details of our callers (the upstream has
// one client, this proxy), organisation selectors that would let a caller
// bill another organisation with the server key, and Accept-Encoding, so
// that the answer arrives as plain text the proxy can read (the transport
// still negotiates compression on the upstream link itself).
func isDroppedUpstream(canonical string) bool {
	switch canonical {
	case "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded",
		"Openai-Organization", "Openai-Project", "Accept-Encoding":
		return true
	}
	return isCredentialHeader(canonical)
}

// isEventStream reports whether a Content-Type is text/event-stream, with
// or without parameters. It runs on every answer, so it compares instead
// of parsing.
func isEventStream(contentType string) bool {
	const sse = "text/event-stream"
	if len(contentType) < len(sse) || !strings.EqualFold(contentType[:len(sse)], sse) {
		return false
	}
	rest := strings.TrimLeft(contentType[len(sse):], " \t")
	return rest == "" || rest[0] == ';'
}
