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
//
// It runs on every admitted request, so the values are written into one
// buffer and become one string and one slice, instead of a string and a
// slice for each of the eight headers.
func SetHeaders(h http.Header, lim *Limits, s State, now time.Time) {
	var (
		buf   [384]byte
		b     = buf[:0]
		names [len(OwnHeaders)]string
		ends  [len(OwnHeaders)]int
		n     int
	)
	mark := func(name string) { names[n], ends[n] = name, len(b); n++ }

	type bucketState struct {
		names     *bucketHeaders
		rate      Rate
		remaining int64
		reset     time.Duration
	}
	var buckets [2]bucketState
	nb := 0
	if !lim.Requests.Unlimited() {
		buckets[nb] = bucketState{&requestHeaders, lim.Requests, s.RequestsRemaining, s.RequestsReset}
		nb++
	}
	if !lim.Tokens.Unlimited() {
		buckets[nb] = bucketState{&tokenHeaders, lim.Tokens, s.TokensRemaining, s.TokensReset}
		nb++
	}
	for _, k := range buckets[:nb] {
		b = strconv.AppendInt(b, k.rate.Capacity(), 10)
		mark(k.names.limit)
		b = strconv.AppendInt(b, k.remaining, 10)
		mark(k.names.remaining)
		b = append(b, FormatReset(k.reset)...)
		mark(k.names.reset)
	}
	quota := !lim.Quota.Unlimited()
	if nb == 0 && !quota {
		return
	}
	var end time.Time
	if quota {
		end = lim.Quota.Period.End(now)
	}
	for i, k := range buckets[:nb] {
		refill := time.Duration(float64(k.rate.Capacity()) / k.rate.perNano())
		b = appendItem(b, i > 0, k.names.name, param{"q", k.rate.Capacity()}, param{"w", seconds(refill)})
	}
	if quota {
		window := end.Sub(lim.Quota.Period.Start(now))
		b = appendItem(b, nb > 0, "quota", param{"q", lim.Quota.N}, param{"w", seconds(window)})
	}
	mark("Ratelimit-Policy")
	for i, k := range buckets[:nb] {
		b = appendItem(b, i > 0, k.names.name, param{"r", k.remaining}, param{"t", seconds(k.reset)})
	}
	if quota {
		b = appendItem(b, nb > 0, "quota", param{"r", max(lim.Quota.N-s.QuotaUsed, 0)}, param{"t", seconds(end.Sub(now))})
	}
	mark("Ratelimit")

	all := string(b)
	values := make([]string, n)
	from := 0
	for i := range n {
		values[i] = all[from:ends[i]]
		h[names[i]] = values[i : i+1 : i+1]
		from = ends[i]
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
var OwnHeaders = [...]string{
	requestHeaders.limit, requestHeaders.remaining, requestHeaders.reset,
	tokenHeaders.limit, tokenHeaders.remaining, tokenHeaders.reset,
	"Ratelimit-Policy", "Ratelimit",
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

// appendItem appends one item of a structured-field list, after a comma
// unless it is the first.
func appendItem(b []byte, more bool, name string, p1, p2 param) []byte {
	if more {
		b = append(b, ", "...)
	}
	b = append(b, '"')
	b = append(b, name...)
	b = append(b, `";`...)
	b = append(b, p1.key...)
	b = append(b, '=')
	b = strconv.AppendInt(b, p1.v, 10)
	b = append(b, ';')
	b = append(b, p2.key...)
	b = append(b, '=')
	return strconv.AppendInt(b, p2.v, 10)
}

// param is one parameter of a structured-field item: key=v.
type param struct {
	key string
	v   int64
}

// seconds rounds d up to whole seconds.
func seconds(d time.Duration) int64 {
	return int64(math.Ceil(d.Seconds()))
}
