package admission

import (
	"sync"
	"time"
)

// The pace the upstream was learned to take. Without upstream_limits the
// proxy knows the upstream's capacity only from its word: a server key
// spent (a 429 about the key) until a reset. Holding the queue until the
// reset and then letting every waiter go at once would spend the key
// again at once, and the order the queue keeps would be lost in the
// rush. So the queue paces what it sends, as TCP paces a link it cannot
// see: each time the upstream says the key is spent, the pace is cut to
// paceCut of what the upstream answered with success in the last second
// (or of the pace, when lower); while it says nothing, the pace grows by
// paceGrowth a second. The pace engages only once the upstream spoke,
// and is forgotten after paceForget of silence.
const (
	paceCut    = 0.7
	paceGrowth = 1.0 / 32
	paceMin    = 1.0 // requests a second: the pace never stops everything
	paceForget = 10 * time.Minute
	// paceBurst is how much of a second's pace goes at once.
	paceBurst = 0.1
)

// pace is the learned pace, a token bucket of a learned rate. Safe for
// concurrent use; the zero value has learned nothing and holds nothing.
type pace struct {
	mu     sync.Mutex
	rate   float64   // requests a second; 0 while nothing is learned
	tokens float64   // of the bucket, at at
	at     time.Time // when tokens and rate were last brought up to date
	cut    time.Time // when the rate was last cut
	// served counts 2xx answers in the current second, served[0], and
	// in the one before; second is the unix second of served[0].
	served [2]float64
	second int64
}

// answered counts an answer of the upstream's with success at now.
func (p *pace) answered(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.roll(now)
	p.served[0]++
}

// roll moves the served counts to now's second. p.mu is held.
func (p *pace) roll(now time.Time) {
	s := now.Unix()
	switch {
	case s == p.second:
	case s == p.second+1:
		p.served[1], p.served[0] = p.served[0], 0
	default:
		p.served = [2]float64{}
	}
	p.second = s
}

// servedLastSecond is the 2xx answers of the second up to now: the
// current second's, and the part of the one before still in it. p.mu
// is held.
func (p *pace) servedLastSecond(now time.Time) float64 {
	p.roll(now)
	into := float64(now.Nanosecond()) / float64(time.Second)
	return p.served[0] + p.served[1]*(1-into)
}

// spent cuts the pace at now: the upstream said a server key is spent.
// One burst of such answers is one cut: within a second of a cut, the
// next changes nothing.
func (p *pace) spent(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.cut.IsZero() && now.Sub(p.cut) < time.Second {
		return
	}
	p.update(now)
	took := p.servedLastSecond(now)
	if p.rate > 0 {
		took = min(took, p.rate)
	}
	p.rate = max(paceMin, paceCut*took)
	p.tokens, p.at, p.cut = 0, now, now
}

// update brings the rate and the bucket up to now. p.mu is held.
func (p *pace) update(now time.Time) {
	if p.rate == 0 {
		return
	}
	if now.Sub(p.cut) > paceForget {
		p.rate, p.tokens = 0, 0
		return
	}
	dt := now.Sub(p.at).Seconds()
	if dt <= 0 {
		return
	}
	// It grows from a second after the cut: the answers to what went
	// before it may still be arriving.
	if grow := min(dt, now.Sub(p.cut).Seconds()-1); grow > 0 {
		p.rate *= 1 + paceGrowth*grow
	}
	p.tokens = min(max(1, p.rate*paceBurst), p.tokens+p.rate*dt)
	p.at = now
}

// take takes one request's place in the pace at now, or says how long
// until there is one. Nothing learned: nothing held.
func (p *pace) take(now time.Time) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.update(now)
	if p.rate == 0 {
		return 0
	}
	if p.tokens >= 1 {
		p.tokens--
		return 0
	}
	return max(time.Duration((1-p.tokens)/p.rate*float64(time.Second)), time.Millisecond)
}
