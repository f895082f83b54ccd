package limiter

import (
	"math"
	"time"
)

// Rate is a number of units allowed per window, with a burst: a token
// bucket of Burst units refilled at N per Window. The zero Rate is no
// limit.
type Rate struct {
	N      int64
	Window time.Duration
	Burst  int64 // 0 means N
}

// Unlimited reports whether r sets no limit.
func (r Rate) Unlimited() bool { return r.N <= 0 || r.Window <= 0 }

func (r Rate) burst() float64 { return float64(r.Capacity()) }

// Capacity is what the bucket holds when full: Burst, or N without one.
// Headers and /v1/usage report it as the limit.
func (r Rate) Capacity() int64 {
	if r.Burst > 0 {
		return r.Burst
	}
	return r.N
}

// FormatReset writes a time until full as OpenAI does in
// x-ratelimit-reset-*: a duration such as 6m0s, to the millisecond.
func FormatReset(d time.Duration) string { return d.Round(time.Millisecond).String() }

// perNano is the refill rate in units per nanosecond.
func (r Rate) perNano() float64 { return float64(r.N) / float64(r.Window) }

// bucket is a token bucket that can go into debt, so that a charge known
// only afterwards (the tokens an answer really used) is never lost: the
// debt delays later requests instead. 16 bytes, no lock of its own.
//
// The zero bucket is full: a client seen for the first time has its burst.
type bucket struct {
	used float64 // units below full at time at; negative never, above burst is debt
	at   int64   // unix nanoseconds of used
}

// startShare starts b empty at since as a bucket of r, a share of a
// shared limit (see Memory.startShare), unless it was used since then.
func (b *bucket) startShare(r Rate, since int64) {
	if !r.Unlimited() && b.at < since {
		*b = bucket{used: r.burst(), at: since}
	}
}

// scale keeps how spent b is, counted in rate was, as a bucket of r.
func (b *bucket) scale(was, r Rate) {
	if !was.Unlimited() && !r.Unlimited() && was.burst() != r.burst() {
		b.used *= r.burst() / was.burst()
	}
}

// refill brings used to now.
func (b *bucket) refill(r Rate, now int64) {
	if now > b.at {
		b.used = math.Max(0, b.used-float64(now-b.at)*r.perNano())
		b.at = now
	}
}

// take takes n units if the bucket holds them at now. Otherwise it takes
// nothing and returns how long until it would hold them; a request for
// more than the burst can never be served and waits forever (-1).
func (b *bucket) take(r Rate, n float64, now int64) (bool, time.Duration) {
	b.refill(r, now)
	burst := r.burst()
	if n > burst {
		return false, -1
	}
	if b.used+n <= burst {
		b.used += n
		return true, 0
	}
	return false, nanos((b.used + n - burst) / r.perNano())
}

// charge adds n units (negative n refunds), into debt if need be.
func (b *bucket) charge(r Rate, n float64, now int64) {
	b.refill(r, now)
	b.used = math.Max(0, b.used+n)
}

// remaining returns the units available at now and how long until the
// bucket is full again.
func (b *bucket) remaining(r Rate, now int64) (int64, time.Duration) {
	b.refill(r, now)
	left := max(r.burst()-b.used, 0)
	return int64(left), nanos(b.used / r.perNano())
}

// full reports whether the bucket is full at now: forgetting it then loses
// nothing, since a new bucket starts full.
func (b *bucket) full(r Rate, now int64) bool {
	return b.used-float64(now-b.at)*r.perNano() <= 0
}

// nanos converts a float of nanoseconds to a Duration, rounding up so that
// waiting that long is always enough.
func nanos(f float64) time.Duration {
	return time.Duration(math.Ceil(f))
}
