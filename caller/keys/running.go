package keys

import (
	"slices"
	"sync"
)

// services are the started Services, which the admin routes manage: the
// admin API is set up by Caddy apart from the HTTP handlers that own
// them.
var services struct {
	mu      sync.Mutex
	running map[*Service]struct{}
}

// registerService makes s manageable through the admin API.
func registerService(s *Service) {
	services.mu.Lock()
	defer services.mu.Unlock()
	if services.running == nil {
		services.running = make(map[*Service]struct{})
	}
	services.running[s] = struct{}{}
}

// unregisterService undoes registerService.
func unregisterService(s *Service) {
	services.mu.Lock()
	defer services.mu.Unlock()
	delete(services.running, s)
}

// Started returns the started services, which Caddy's admin API manages.
func Started() []*Service {
	services.mu.Lock()
	defer services.mu.Unlock()
	started := make([]*Service, 0, len(services.running))
	for s := range services.running {
		started = append(started, s)
	}
	return started
}

// Spec is the store spec the service was made with, canonical.
func (s *Service) Spec() string { return s.spec }

// Name is the store's name for people: its spec without secrets.
func (s *Service) Name() string { return s.name }

// UseTiers notes that a config using the Service has the tiers names,
// until the function returned is called (when that config is cleaned
// up). During a reload the old and the new config's tiers are both known.
func (s *Service) UseTiers(names []string) (release func()) {
	s.tiersMu.Lock()
	defer s.tiersMu.Unlock()
	if s.tiers == nil {
		s.tiers = make(map[string]int)
	}
	for _, n := range names {
		s.tiers[n]++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			s.tiersMu.Lock()
			defer s.tiersMu.Unlock()
			for _, n := range names {
				if s.tiers[n]--; s.tiers[n] <= 0 {
					delete(s.tiers, n)
				}
			}
		})
	}
}

// ConfiguredTiers returns the tiers, sorted, that some loaded config
// using the Service has: a key of another tier is refused.
func (s *Service) ConfiguredTiers() []string {
	s.tiersMu.Lock()
	defer s.tiersMu.Unlock()
	names := make([]string, 0, len(s.tiers))
	for n := range s.tiers {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}
