// Package limiter enforces limits per caller: the tiers' request, token,
// concurrency and quota limits, and the throttle on failed authentication.
package limiter

import (
	"hash/maphash"
	"net/netip"
	"sync"
	"time"
)

// failShards spreads callers over locks so that failing callers on
// different cores rarely contend.
const failShards = 64

// FailureThrottle counts failed authentications per client address in a
// fixed window and blocks an address that reached the limit until its
// window ends. IPv6 addresses count per /64, the block a single host
// usually controls. Memory is bounded by MaxTracked: when full, expired
// windows are dropped first, then arbitrary ones, which can only let an
// attacker through sooner, never block an innocent caller.
//
// The zero value is not usable; use NewFailureThrottle. It is safe for
// concurrent use.
type FailureThrottle struct {
	limit  int
	window time.Duration
	perShd int // entries allowed per shard
	seed   maphash.Seed
	shards [failShards]failShard
}

type failShard struct {
	mu sync.Mutex // protects m
	m  map[netip.Addr]failWindow
}

type failWindow struct {
	start time.Time
	count int
}

// NewFailureThrottle allows limit failures per window per address, and
// tracks at most maxTracked addresses.
func NewFailureThrottle(limit int, window time.Duration, maxTracked int) *FailureThrottle {
	t := &FailureThrottle{
		limit:  limit,
		window: window,
		perShd: max(maxTracked/failShards, 1),
		seed:   maphash.MakeSeed(),
	}
	for i := range t.shards {
		t.shards[i].m = make(map[netip.Addr]failWindow)
	}
	return t
}

// Blocked reports whether addr used up its failures at now, and if so how
// long until its window ends.
func (t *FailureThrottle) Blocked(addr netip.Addr, now time.Time) (time.Duration, bool) {
	addr = AddrBucket(addr)
	s := t.shard(addr)
	s.mu.Lock()
	w, ok := s.m[addr]
	s.mu.Unlock()
	if !ok || w.count < t.limit {
		return 0, false
	}
	if left := w.start.Add(t.window).Sub(now); left > 0 {
		return left, true
	}
	return 0, false
}

// Fail records one failed authentication from addr at now.
func (t *FailureThrottle) Fail(addr netip.Addr, now time.Time) {
	addr = AddrBucket(addr)
	s := t.shard(addr)
	s.mu.Lock()
	defer s.mu.Unlock()
	w, ok := s.m[addr]
	if !ok || now.Sub(w.start) >= t.window {
		if !ok && len(s.m) >= t.perShd {
			s.evict(now, t.window)
		}
		w = failWindow{start: now}
	}
	w.count++
	s.m[addr] = w
}

// Tracked returns how many addresses are tracked.
func (t *FailureThrottle) Tracked() int {
	n := 0
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		n += len(s.m)
		s.mu.Unlock()
	}
	return n
}

// evict makes room for one entry: every expired window goes, or, when none
// has expired, one arbitrary entry.
func (s *failShard) evict(now time.Time, window time.Duration) {
	before := len(s.m)
	for a, w := range s.m {
		if now.Sub(w.start) >= window {
			delete(s.m, a)
		}
	}
	if len(s.m) < before {
		return
	}
	for a := range s.m {
		delete(s.m, a)
		return
	}
}

func (t *FailureThrottle) shard(addr netip.Addr) *failShard {
	b := addr.As16()
	return &t.shards[maphash.Bytes(t.seed, b[:])%failShards]
}

// AddrBucket maps an address to what it is counted as: IPv4 itself, IPv6 its /64.
func AddrBucket(addr netip.Addr) netip.Addr {
	addr = addr.Unmap().WithZone("")
	if addr.Is6() {
		p, err := addr.Prefix(64)
		if err == nil {
			return p.Addr()
		}
	}
	return addr
}
