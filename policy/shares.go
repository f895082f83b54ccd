package policy

import (
	"fmt"

	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// provisionShares gives each tier its share of max_buffered and its
// callers' ceiling, where the config sets none (see Tier.MaxBuffered),
// and makes the counts that enforce them. The anonymous tier is open to
// anyone, so by default it gets little: a flood of keyless callers then
// fills only their own share, and the other tiers keep theirs.
func provisionShares(h *Config) {
	rest := h.MaxBuffered
	var split []*Tier
	for _, t := range h.Tiers {
		if t.MaxBuffered != 0 {
			rest -= t.MaxBuffered
		} else {
			split = append(split, t)
		}
	}
	if anon := h.Tiers[h.Anonymous]; anon != nil && anon.MaxBuffered == 0 && len(split) > 1 {
		anon.MaxBuffered = min(rest, max(h.MaxBody, h.MaxBuffered/8))
		rest -= anon.MaxBuffered
		split = deleteTier(split, anon)
	}
	for _, t := range split {
		t.MaxBuffered = rest / int64(len(split))
	}
	callers := proxy.NewCallers()
	for _, t := range h.Tiers {
		if t.MaxBufferedPerCaller == 0 {
			per := t.MaxBuffered / 4
			// Concurrent bodies of at most max_body each: never more.
			if c := int64(t.Concurrent); c > 0 && h.MaxBody > 0 && c <= per/h.MaxBody {
				per = c * h.MaxBody
			}
			t.MaxBufferedPerCaller = max(per, h.MaxBody)
		}
		t.bodies = callers.Share(t.MaxBuffered, t.MaxBufferedPerCaller)
	}
}

func deleteTier(tiers []*Tier, t *Tier) []*Tier {
	for i := range tiers {
		if tiers[i] == t {
			return append(tiers[:i], tiers[i+1:]...)
		}
	}
	return tiers
}

// validateShares checks that every tier can receive a largest body and
// that the tiers' shares fit in max_buffered, so that each share is
// there for its tier whatever the others hold.
func validateShares(h *Config) error {
	least := max(h.MaxBody, proxy.MinBuffered)
	var sum int64
	for name, t := range h.Tiers {
		if t == nil {
			continue
		}
		if t.MaxBuffered < least {
			return fmt.Errorf("tier %s: max_buffered (%d) must be at least max_body (%d) and %d: set it, or raise the handler's max_buffered (%d), which the tiers without one split",
				name, t.MaxBuffered, h.MaxBody, proxy.MinBuffered, h.MaxBuffered)
		}
		if t.MaxBufferedPerCaller < least || t.MaxBufferedPerCaller > t.MaxBuffered {
			return fmt.Errorf("tier %s: max_buffered per_caller (%d) must be between max_body (%d) and the tier's max_buffered (%d)",
				name, t.MaxBufferedPerCaller, least, t.MaxBuffered)
		}
		sum += t.MaxBuffered
	}
	if sum > h.MaxBuffered {
		return fmt.Errorf("the tiers' max_buffered add up to %d, more than max_buffered (%d): each share must be there for its tier", sum, h.MaxBuffered)
	}
	return nil
}
