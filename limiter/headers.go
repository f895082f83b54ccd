package limiter

import (
	"math"
	"net/http"
	"strconv"
	"time"
)

// SetHeaders writes the caller's own standing, as OpenAI does
// (x-ratelimit-{limit,remaining,reset}-{requests,tokens}, reset as a
// duration such as 6m0s) and as the IETF RateLimit-Policy and RateLimit
// fields. A bucket is described as what it is: capacity q refilled over w
// seconds. Limits the tier does not set are left out.
func SetHeaders(h http.Header, lim *Limits, s State, now time.Time) {
	var policy, state []byte
	if !lim.Requests.Unlimited() {
		policy, state = setBucket(h, &requestHeaders, lim.Requests, s.RequestsRemaining, s.RequestsReset, policy, state)
	}
	if !lim.Tokens.Unlimited() {
		policy, state = setBucket(h, &tokenHeaders, lim.Tokens, s.TokensRemaining, s.TokensReset, policy, state)
	}
	if !lim.Quota.Unlimited() {
		end := lim.Quota.Period.End(now)
		window := end.Sub(lim.Quota.Period.Start(now))
		policy = appendItem(policy, "quota", "q", lim.Quota.N, "w", seconds(window))
		state = appendItem(state, "quota", "r", max(lim.Quota.N-s.QuotaUsed, 0), "t", seconds(end.Sub(now)))
	}
	if policy != nil {
		h["Ratelimit-Policy"] = []string{string(policy)}
		h["Ratelimit"] = []string{string(state)}
	}
}

// bucketHeaders name the OpenAI-style headers of one bucket, canonical.
type bucketHeaders struct{ name, limit, remaining, reset string }

var (
	requestHeaders = bucketHeaders{"requests", "X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Requests", "X-Ratelimit-Reset-Requests"}
	tokenHeaders   = bucketHeaders{"tokens", "X-Ratelimit-Limit-Tokens", "X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Reset-Tokens"}
)

// OwnHeaders are the headers SetHeaders writes: the upstream's own of
// these names must not reach the caller beside them.
var OwnHeaders = []string{
	requestHeaders.limit, requestHeaders.remaining, requestHeaders.reset,
	tokenHeaders.limit, tokenHeaders.remaining, tokenHeaders.reset,
	"Ratelimit-Policy", "Ratelimit",
}

func setBucket(h http.Header, names *bucketHeaders, r Rate, remaining int64, reset time.Duration, policy, state []byte) ([]byte, []byte) {
	capacity := r.Capacity()
	h[names.limit] = []string{strconv.FormatInt(capacity, 10)}
	h[names.remaining] = []string{strconv.FormatInt(remaining, 10)}
	h[names.reset] = []string{FormatReset(reset)}
	refill := time.Duration(float64(capacity) / r.perNano())
	policy = appendItem(policy, names.name, "q", capacity, "w", seconds(refill))
	state = appendItem(state, names.name, "r", remaining, "t", seconds(reset))
	return policy, state
}

// SetRefusalHeaders writes what a 429 of the proxy carries besides the
// caller's standing: Retry-After in whole seconds that are enough, and the
// upstream-style X-RateLimit-Limit/Remaining/Reset (reset in epoch
// seconds) of the limit that refused; x-should-retry: false when waiting
// a few seconds cannot help.
func SetRefusalHeaders(h http.Header, lim *Limits, d Decision, now time.Time) {
	var limit, remaining int64
	reset := now.Add(max(d.RetryAfter, 0))
	switch d.Reason {
	case RequestLimit:
		limit, remaining = lim.Requests.Capacity(), d.RequestsRemaining
	case TokenLimit, TooLarge:
		limit, remaining = lim.Tokens.Capacity(), d.TokensRemaining
	case ConcurrencyLimit:
		limit = int64(lim.Concurrent)
	case QuotaLimit:
		limit, remaining = lim.Quota.N, max(lim.Quota.N-d.QuotaUsed, 0)
		reset = d.QuotaReset
	}
	retry := d.RetryAfter
	if d.Reason == TooLarge {
		retry = lim.Tokens.Window
	}
	h["Retry-After"] = []string{strconv.FormatInt(seconds(retry), 10)}
	h["X-Ratelimit-Limit"] = []string{strconv.FormatInt(limit, 10)}
	h["X-Ratelimit-Remaining"] = []string{strconv.FormatInt(remaining, 10)}
	h["X-Ratelimit-Reset"] = []string{strconv.FormatInt(int64(math.Ceil(float64(reset.UnixNano())/1e9)), 10)}
	if d.Reason == QuotaLimit || d.Reason == TooLarge {
		h["X-Should-Retry"] = []string{"false"}
	}
}

func appendItem(b []byte, name, k1 string, v1 int64, k2 string, v2 int64) []byte {
	if b != nil {
		b = append(b, ", "...)
	}
	b = append(b, '"')
	b = append(b, name...)
	b = append(b, `";`...)
	b = append(b, k1...)
	b = append(b, '=')
	b = strconv.AppendInt(b, v1, 10)
	b = append(b, ';')
	b = append(b, k2...)
	b = append(b, '=')
	return strconv.AppendInt(b, v2, 10)
}

// seconds rounds d up to whole seconds.
func seconds(d time.Duration) int64 {
	return int64(math.Ceil(d.Seconds()))
}
