package admission

import (
	"errors"
	"math"
)

// The order of a queue, apart from waiting and time: which waiter goes
// next. Between tiers it is weighted fair, by stride scheduling: each
// tier has a pass, advanced by 1/weight for each request it dispatches,
// and the tier with the lowest pass goes next, so that two backlogged
// tiers of weights 3 and 1 dispatch exactly 3 to 1. A tier that had
// nothing queued rejoins at the current virtual time (the pass of the
// last tier served), banking no credit for its idle time. Within a tier,
// the callers with requests queued take turns, round robin: exact
// fairness between callers, where Kubernetes' API Priority and Fairness
// uses shuffle sharding into a fixed number of queues, in which two
// callers may share one. An exact map of callers is affordable here
// because it is bounded by the queue's length.
//
// A sched is not safe for concurrent use: Queue guards it.
type sched struct {
	tiers map[string]*tierQueue
	vtime float64 // the virtual time: the pass of the tier served last
	n     int     // waiters queued, over every tier
}

// tierQueue is one tier's waiters, by caller.
type tierQueue struct {
	name    string
	stride  float64 // 1/weight
	pass    float64
	ring    []*callerQueue // callers with waiters, in turn order
	next    int            // whose turn it is in ring
	callers map[string]*callerQueue
	n       int // waiters queued
}

// callerQueue is one caller's waiters, first come first served.
type callerQueue struct {
	id      string
	waiters []*waiter
}

var (
	errFull       = errors.New("the queue is full")
	errCallerFull = errors.New("the caller holds as many places as it may")
)

func newSched() sched { return sched{tiers: make(map[string]*tierQueue)} }

// push queues w, of caller id in the tier named tier with weight, unless
// the queue holds length waiters, or the caller perCaller (counting
// others, its places held outside the order).
func (s *sched) push(w *waiter, tier string, weight int, id string, length, perCaller, others int) error {
	if s.n >= length {
		return errFull
	}
	t := s.tiers[tier]
	if t == nil {
		t = &tierQueue{name: tier, callers: make(map[string]*callerQueue)}
		s.tiers[tier] = t
	}
	t.stride = 1 / float64(max(1, weight))
	c := t.callers[id]
	if c != nil && len(c.waiters)+others >= perCaller || c == nil && others >= perCaller {
		return errCallerFull
	}
	if c == nil {
		c = &callerQueue{id: id}
		t.callers[id] = c
		t.ring = append(t.ring, c)
	}
	if t.n == 0 {
		// Rejoining: no credit for the time it had nothing queued.
		t.pass = max(t.pass, s.vtime)
	}
	c.waiters = append(c.waiters, w)
	w.tq, w.cq = t, c
	t.n++
	s.n++
	return nil
}

// head returns the waiter whose turn it is, or nil when none waits.
func (s *sched) head() *waiter {
	var best *tierQueue
	for _, t := range s.tiers {
		if t.n == 0 {
			continue
		}
		if best == nil || t.pass < best.pass || t.pass == best.pass && t.name < best.name {
			best = t
		}
	}
	if best == nil {
		return nil
	}
	return best.ring[best.next].waiters[0]
}

// dispatch takes w out of the order as served: its tier's pass advances
// and the turn in its tier passes to the next caller.
func (s *sched) dispatch(w *waiter) {
	t, c := w.tq, w.cq
	s.vtime = t.pass
	t.pass += t.stride
	i := s.remove(w)
	if i < 0 {
		return
	}
	// The turn goes to the caller after w's; when w's caller left the
	// ring, that one is now at i.
	if i < len(t.ring) && t.ring[i] == c {
		i++
	}
	if len(t.ring) > 0 {
		t.next = i % len(t.ring)
	} else {
		t.next = 0
	}
}

// remove takes w out of the order unserved (it left, or was served
// through dispatch), returning the ring index its caller had, or -1
// when w was not queued.
func (s *sched) remove(w *waiter) int {
	t, c := w.tq, w.cq
	if t == nil {
		return -1
	}
	w.tq, w.cq = nil, nil
	for j, o := range c.waiters {
		if o == w {
			copy(c.waiters[j:], c.waiters[j+1:])
			c.waiters[len(c.waiters)-1] = nil
			c.waiters = c.waiters[:len(c.waiters)-1]
			break
		}
	}
	t.n--
	s.n--
	i := 0
	for i < len(t.ring) && t.ring[i] != c {
		i++
	}
	if len(c.waiters) == 0 {
		delete(t.callers, c.id)
		t.ring = append(t.ring[:i], t.ring[i+1:]...)
		if i < t.next {
			t.next--
		}
		if t.next >= len(t.ring) {
			t.next = 0
		}
	}
	if t.n == 0 && len(s.tiers) > 64 {
		// Tiers are configured names, but keep the map small anyway.
		delete(s.tiers, t.name)
	}
	return i
}

// ahead estimates how many dispatches come before a newcomer of caller
// in a tier of weight. Within the tier, callers take turns: before the
// newcomer's turn, its caller's k places queued now go, and each other
// caller of the tier gets at most k+1 turns. Between tiers, its tier
// gets its weight's share of the order while every tier with waiters
// stays backlogged. At most every place queued goes before it. A light
// caller behind a heavy one is thus told the short wait its turn takes,
// not the heavy one's.
func (s *sched) ahead(tier, caller string, weight int) int {
	var total float64
	inTier, backlogged := 0, false
	for _, t := range s.tiers {
		if t.n > 0 {
			total += 1 / t.stride
		}
		if t.name != tier || t.n == 0 {
			continue
		}
		backlogged = true
		k := 0
		if c := t.callers[caller]; c != nil {
			k = len(c.waiters)
		}
		inTier = k
		for _, c := range t.ring {
			if c.id != caller {
				inTier += min(len(c.waiters), k+1)
			}
		}
	}
	w := float64(max(1, weight))
	if !backlogged {
		total += w
	}
	return min(s.n, int(math.Ceil(float64(inTier)*total/w)))
}
