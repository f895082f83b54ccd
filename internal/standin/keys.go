package standin

import (
	"strings"
	"sync"
	"sync/atomic"
)

// keyBook is what the server knows of the keys it is sent: those revoked
// at run time, which it answers 401 as an unknown key, and, when
// Options.CountKeys is set, the requests each key sent.
type keyBook struct {
	counting bool
	any      atomic.Bool // a key is revoked: authorized must look

	mu      sync.Mutex // protects the maps
	revoked map[string]bool
	counts  map[string]int
}

// Revoke makes the server refuse key with 401, as the real API refuses
// a key revoked in its dashboard, until Restore.
func (s *Server) Revoke(key string) {
	s.keys.mu.Lock()
	defer s.keys.mu.Unlock()
	if s.keys.revoked == nil {
		s.keys.revoked = make(map[string]bool)
	}
	s.keys.revoked[key] = true
	s.keys.any.Store(true)
}

// Restore accepts a revoked key again.
func (s *Server) Restore(key string) {
	s.keys.mu.Lock()
	defer s.keys.mu.Unlock()
	delete(s.keys.revoked, key)
	s.keys.any.Store(len(s.keys.revoked) > 0)
}

// KeyCount returns the requests sent with key since the server started
// (or Reset), refused ones included; 0 unless Options.CountKeys.
func (s *Server) KeyCount(key string) int {
	s.keys.mu.Lock()
	defer s.keys.mu.Unlock()
	return s.keys.counts[key]
}

// revokedKey reports whether the bearer key of auth was revoked.
func (s *Server) revokedKey(key string) bool {
	if !s.keys.any.Load() {
		return false
	}
	s.keys.mu.Lock()
	defer s.keys.mu.Unlock()
	return s.keys.revoked[key]
}

// countKey counts a request with the Authorization value auth.
func (s *Server) countKey(auth string) {
	if !s.keys.counting {
		return
	}
	_, key, _ := strings.Cut(auth, " ")
	s.keys.mu.Lock()
	defer s.keys.mu.Unlock()
	if s.keys.counts == nil {
		s.keys.counts = make(map[string]int)
	}
	s.keys.counts[key]++
}

// resetKeys forgets the counts.
func (s *Server) resetKeys() {
	s.keys.mu.Lock()
	defer s.keys.mu.Unlock()
	clear(s.keys.counts)
}
