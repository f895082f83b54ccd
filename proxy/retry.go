package proxy

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Retry defaults.
const (
	DefaultRetries = 2
	DefaultMaxWait = 10 * time.Second
	// firstBackoff doubles with each retry, with jitter, unless the
	// upstream says how long to wait.
	firstBackoff = 250 * time.Millisecond
)

// retryPolicy retries what the upstream failed before answering: 502,
// 503, failed connections, and a 429 that looks transient: one naming a
// wait that fits in what is left of max_wait, and not about a spent quota.
// A 429 about the request itself (too large for a minute's budget) would
// only be refused again, so it goes back to its caller at once. It runs
// inside the transport, so no byte has reached the client yet; a stream
// that started is never retried. Retries wait in their caller's request
// alone: other callers are stopped only by evidence that the key is spent.
type retryPolicy struct {
	retries int
	maxWait time.Duration
}

// retryable reports whether a status other than 429 is retried.
func retryable(status int) bool {
	return status == http.StatusBadGateway || status == http.StatusServiceUnavailable
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
	return jitter(n)
}

// jitter is exponential backoff with full jitter before retry n.
func jitter(n int) time.Duration {
	ceiling := firstBackoff << n
	return ceiling/2 + rand.N(ceiling/2+1)
}

// retryAfter reads retry-after-ms (OpenAI's, more precise) or Retry-After
// as seconds or an HTTP date.
func retryAfter(h http.Header, now time.Time) (time.Duration, bool) {
	if v := h.Get("Retry-After-Ms"); v != "" {
		if ms, err := strconv.ParseFloat(v, 64); err == nil && ms >= 0 && ms < 1e12 {
			return time.Duration(ms * float64(time.Millisecond)), true
		}
	}
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

// discard drains a little of a body we will not pass on, so that the
// connection can be reused, and closes it.
func discard(res *http.Response) {
	_, _ = io.CopyN(io.Discard, res.Body, 64<<10)
	res.Body.Close()
}

// limitWord is what an upstream answer says of limits: whether the server
// key or the request's model is spent, and for a 429 whether waiting may
// cure it.
type limitWord struct {
	// keyUntil is when the server key is usable again, by the answer's
	// own evidence about the whole key; zero when it gave none.
	// modelUntil is the same of the request's model, by evidence about
	// the model. Only these stop other callers: a 429 about one request
	// (too large, say) is that caller's alone. Both are the upstream's
	// claims; the exhaustion bounds what they impose.
	keyUntil, modelUntil time.Time
	// wait is how long the upstream asked this caller to wait
	// (Retry-After, retry-after-ms, or the spent scope's reset); hasWait
	// says it asked at all.
	wait    time.Duration
	hasWait bool
	// quota is a 429 about the key's billing quota: no wait cures it soon.
	quota bool
}

// The rate-limit headers that speak of the server key: remaining, and the
// reset that goes with it. The bare X-RateLimit-Remaining/Reset are the
// Vigthoria API's, counted for the whole key (whatever the model);
// OpenAI's per-kind forms are counted per model, and speak of the
// request's model alone.
var (
	keyLimitHeaders   = [...][2]string{{"X-Ratelimit-Remaining", "X-Ratelimit-Reset"}}
	modelLimitHeaders = [...][2]string{
		{"X-Ratelimit-Remaining-Requests", "X-Ratelimit-Reset-Requests"},
		{"X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Reset-Tokens"},
	}
)

// quotaPause is how long the key counts as exhausted after a 429 about its
// quota that says nothing of when it returns.
const quotaPause = time.Minute

// maxErrorPeek bounds what is read of a 429's body to learn its code.
const maxErrorPeek = 8 << 10

// readLimitWord reads res's word on limits at now. A scope counts as
// spent only on evidence about it: the key on a bare remaining count of 0
// (with its reset, or on a 429 itself) or a 429 whose error names the
// key's quota (insufficient_quota and its kin); the request's model on a
// per-model remaining count of 0. A 429 without such evidence speaks of
// one request, and res goes back to its caller alone. It may read the
// start of a 429's body, leaving res.Body as it was to its reader.
func readLimitWord(res *http.Response, now time.Time) limitWord {
	var w limitWord
	limited := res.StatusCode == http.StatusTooManyRequests
	keySpent := spentUntil(res.Header, keyLimitHeaders[:], limited, now, &w.keyUntil)
	modelSpent := spentUntil(res.Header, modelLimitHeaders[:], limited, now, &w.modelUntil)
	if !limited {
		return w
	}
	if d, ok := retryAfter(res.Header, now); ok {
		w.wait, w.hasWait = d, true
	}
	if quotaError(res) {
		keySpent, w.quota = true, true
	}
	if !keySpent && !modelSpent {
		return w
	}
	pause := time.Second
	if w.quota {
		pause = quotaPause
	}
	for _, spent := range [...]struct {
		is    bool
		until *time.Time
	}{{keySpent, &w.keyUntil}, {modelSpent, &w.modelUntil}} {
		switch {
		case !spent.is:
		case w.hasWait:
			// A 429's own Retry-After is the upstream's word on when to
			// come back, over a counter's reset.
			*spent.until = now.Add(w.wait)
		case spent.until.IsZero():
			*spent.until = now.Add(pause)
		}
	}
	if !w.hasWait {
		w.wait, w.hasWait = max(later(w.keyUntil, w.modelUntil).Sub(now), 0), true
	}
	return w
}

// spentUntil reads pairs of remaining and reset headers: a remaining of
// 0 raises until to its reset. It reports whether any said spent; on a
// 429 (limited) a remaining of 0 without a reset says so too.
func spentUntil(h http.Header, pairs [][2]string, limited bool, now time.Time, until *time.Time) bool {
	spent := false
	for _, pair := range pairs {
		if !isZeroCount(h.Get(pair[0])) {
			continue
		}
		if reset, ok := parseReset(h.Get(pair[1]), now); ok {
			spent = true
			*until = later(*until, reset)
		} else if limited {
			spent = true
		}
	}
	return spent
}

// retryable429 reports whether a 429 so described may be retried after
// its wait, with left of max_wait still to spend: only when the upstream
// named a short wait. A per-request refusal without one, or a spent
// quota, will answer the same again.
func (w limitWord) retryable429(left time.Duration) bool {
	return w.hasWait && !w.quota && w.wait <= left
}

// isZeroCount reports whether a remaining-count header says none is left.
func isZeroCount(v string) bool {
	if v == "" {
		return false
	}
	n, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
	return err == nil && n <= 0
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// quotaError reports whether a 429's body is an error naming the key's
// quota or billing (OpenAI's insufficient_quota, billing_hard_limit_reached
// and their kin), in its code or type. The peeked bytes are put back.
func quotaError(res *http.Response) bool {
	if res.Body == nil || res.Body == http.NoBody {
		return false
	}
	peek, err := io.ReadAll(io.LimitReader(res.Body, maxErrorPeek))
	res.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(peek), res.Body), res.Body}
	if err != nil {
		return false
	}
	var e struct {
		Error struct {
			Type string `json:"type"`
			Code any    `json:"code"` // a string, or a number in some APIs
		} `json:"error"`
	}
	if json.Unmarshal(peek, &e) != nil {
		return false
	}
	code, _ := e.Error.Code.(string)
	for _, s := range [...]string{strings.ToLower(e.Error.Type), strings.ToLower(code)} {
		if strings.Contains(s, "quota") || strings.Contains(s, "billing") {
			return true
		}
	}
	return false
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
