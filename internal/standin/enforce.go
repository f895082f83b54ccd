package standin

import (
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Enforce is the stand-in's own limits, as a real upstream enforces its
// key's: past them a request gets 429 rate_limit_exceeded with
// Retry-After and X-RateLimit-Remaining: 0, and is counted
// (Server.Refused429). The zero Enforce enforces nothing.
type Enforce struct {
	// Requests per Window, as a token bucket of Requests that refills
	// evenly over Window (OpenAI's limits behave so); 0: no limit.
	Requests int
	Window   time.Duration
	// Concurrent is the most requests answered at once; 0: no limit.
	Concurrent int
}

// enforcer applies an Enforce.
type enforcer struct {
	lim     Enforce
	refused atomic.Int64

	mu       sync.Mutex // protects the fields below
	tokens   float64
	at       time.Time // when tokens was last refilled
	inFlight int
}

func newEnforcer(lim Enforce) *enforcer {
	if lim.Requests <= 0 && lim.Concurrent <= 0 {
		return nil
	}
	return &enforcer{lim: lim, tokens: float64(lim.Requests)}
}

// admit takes one request and its slot at now, or answers its 429 and
// reports false. A request admitted is released by done.
func (e *enforcer) admit(w http.ResponseWriter, now time.Time) bool {
	e.mu.Lock()
	wait := time.Duration(0)
	if n := e.lim.Requests; n > 0 {
		rate := float64(n) / e.lim.Window.Seconds()
		if !e.at.IsZero() {
			e.tokens = min(float64(n), e.tokens+now.Sub(e.at).Seconds()*rate)
		}
		e.at = now
		if e.tokens < 1 {
			wait = time.Duration((1 - e.tokens) / rate * float64(time.Second))
		}
	}
	busy := e.lim.Concurrent > 0 && e.inFlight >= e.lim.Concurrent
	ok := wait == 0 && !busy
	if ok {
		if e.lim.Requests > 0 {
			e.tokens--
		}
		e.inFlight++
	}
	e.mu.Unlock()
	if ok {
		return true
	}
	e.refused.Add(1)
	h := w.Header()
	h.Set("Retry-After", strconv.Itoa(max(1, int((wait+time.Second-1)/time.Second))))
	h.Set("X-Ratelimit-Remaining", "0")
	msg := "Rate limit reached for requests. Please try again later."
	if busy {
		msg = "Too many requests in flight at once. Please try again later."
	}
	writeError(w, http.StatusTooManyRequests, "requests", "rate_limit_exceeded", "", msg)
	return false
}

func (e *enforcer) done() {
	e.mu.Lock()
	e.inFlight--
	e.mu.Unlock()
}

// Refused429 is how many requests the stand-in's own limits (Enforce)
// refused with 429.
func (s *Server) Refused429() int {
	if s.enforce == nil {
		return 0
	}
	return int(s.enforce.refused.Load())
}

// MaxActive is the most requests the server answered at once since it
// started, or since Reset.
func (s *Server) MaxActive() int { return int(s.maxActive.Load()) }

// noteActive raises the high-water mark of requests answered at once to n.
func (s *Server) noteActive(n int64) {
	for {
		m := s.maxActive.Load()
		if n <= m || s.maxActive.CompareAndSwap(m, n) {
			return
		}
	}
}
