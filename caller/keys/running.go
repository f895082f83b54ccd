package keys

import (
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
