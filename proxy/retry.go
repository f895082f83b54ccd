package proxy

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Retry defaults.
const (
	DefaultRetries = 2
	DefaultMaxWait = 10 * time.Second
	// firstBackoff doubles with each retry, with jitter, unless the
	// upstream says how long to wait.
	firstBackoff = 250 * time.Millisecond
)

// retryPolicy retries what the upstream failed before answering: 429,
// 502, 503 and failed connections. It runs inside the transport, so no
// byte has reached the client yet; a stream that started is never retried.
type retryPolicy struct {
	retries int
	maxWait time.Duration
}

func retryable(status int) bool {
	return status == http.StatusTooManyRequests || status == http.StatusBadGateway || status == http.StatusServiceUnavailable
}

// connectFailed reports an error of connecting, where the request surely
// did not reach the upstream and retrying cannot repeat it.
func connectFailed(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// backoff is how long to wait before retry n (0-based): the upstream's
// Retry-After when it gave one, else exponential with full jitter.
func backoff(n int, res *http.Response) time.Duration {
	if res != nil {
		if d, ok := retryAfter(res.Header, time.Now()); ok {
			return d
		}
	}
	ceiling := firstBackoff << n
	return ceiling/2 + rand.N(ceiling/2+1)
}

// retryAfter reads Retry-After as seconds or an HTTP date.
func retryAfter(h http.Header, now time.Time) (time.Duration, bool) {
	v := h.Get("Retry-After")
	if v == "" {
		return 0, false
	}
	if s, err := strconv.ParseInt(v, 10, 64); err == nil && s >= 0 {
		return time.Duration(s) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0), true
	}
	return 0, false
}

// sleepCtx waits d unless ctx ends first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// discard drains a little of a body we will not pass on, so that the
// connection can be reused, and closes it.
func discard(res *http.Response) {
	_, _ = io.CopyN(io.Discard, res.Body, 64<<10)
	res.Body.Close()
}

// SharedExhaustion shares the upstream's word on the server key's
// exhaustion among the instances of a fleet.
type SharedExhaustion interface {
	// Publish says the key is exhausted until then.
	Publish(ctx context.Context, until time.Time) error
	// Fetch returns until when some instance heard it is exhausted.
	Fetch(ctx context.Context) (time.Time, error)
}

// sharedEvery is how often an instance asks the fleet whether the upstream
// said the key is exhausted.
const sharedEvery = time.Second

// sharedTimeout bounds one exchange with the fleet's store.
const sharedTimeout = time.Second

// exhaustion remembers until when the upstream said the server key is
// exhausted, from its 429s and from X-RateLimit-Remaining: 0 with
// X-RateLimit-Reset, so that callers get a local 429 instead of another
// upstream call that would only prolong it. With a shared store, what one
// instance hears reaches the others within about a second; the exchanges
// run off the request path, in a goroutine that ends with them. The zero
// value knows nothing and shares nothing.
type exhaustion struct {
	until    atomic.Int64 // unix nanoseconds
	shared   SharedExhaustion
	fetched  atomic.Int64 // unix nanoseconds of the last fetch started
	fetching atomic.Bool
	logger   *zap.Logger
}

// note reads an upstream answer's verdict on the key.
func (e *exhaustion) note(res *http.Response, now time.Time) {
	var until time.Time
	switch {
	case res.StatusCode == http.StatusTooManyRequests:
		d, ok := retryAfter(res.Header, now)
		if !ok {
			d = time.Second
		}
		until = now.Add(d)
	case res.Header.Get("X-Ratelimit-Remaining") == "0":
		reset, ok := parseReset(res.Header.Get("X-Ratelimit-Reset"), now)
		if !ok {
			return
		}
		until = reset
	default:
		return
	}
	if e.raise(until) && e.shared != nil {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
			defer cancel()
			if err := e.shared.Publish(ctx, until); err != nil {
				e.logger.Warn("sharing the upstream's exhaustion failed", zap.Error(err))
			}
		}()
	}
}

// raise moves until later, reporting whether it did.
func (e *exhaustion) raise(until time.Time) bool {
	for {
		cur := e.until.Load()
		if until.UnixNano() <= cur {
			return false
		}
		if e.until.CompareAndSwap(cur, until.UnixNano()) {
			return true
		}
	}
}

// wait returns how long the upstream is still exhausted at now. With a
// shared store it also starts, at most once a second, a fetch of what the
// other instances heard; its answer counts from the next request on.
func (e *exhaustion) wait(now time.Time) (time.Duration, bool) {
	if e.shared != nil && now.UnixNano()-e.fetched.Load() >= int64(sharedEvery) && e.fetching.CompareAndSwap(false, true) {
		e.fetched.Store(now.UnixNano())
		go func() {
			defer e.fetching.Store(false)
			ctx, cancel := context.WithTimeout(context.Background(), sharedTimeout)
			defer cancel()
			if until, err := e.shared.Fetch(ctx); err == nil {
				e.raise(until)
			}
		}()
	}
	d := time.Duration(e.until.Load() - now.UnixNano())
	return d, d > 0
}

// parseReset reads X-RateLimit-Reset: epoch seconds, seconds from now, or
// a duration such as 6m0s.
func parseReset(v string, now time.Time) (time.Time, bool) {
	if v == "" {
		return time.Time{}, false
	}
	if n, err := strconv.ParseFloat(v, 64); err == nil && n >= 0 {
		if n > 1e9 {
			return time.Unix(0, int64(n*1e9)), true
		}
		return now.Add(time.Duration(n * float64(time.Second))), true
	}
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		return now.Add(d), true
	}
	return time.Time{}, false
}
