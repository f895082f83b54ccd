package vigthoria

import (
	"fmt"
	"slices"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/anonymous"
)

// loadSources loads the identity sources configured under "sources", in
// the order of their names, and the anonymous one that the anonymous
// option names: the option is the source's older spelling, kept so that
// configs written for it keep working.
func (h *Handler) loadSources(ctx caddy.Context) error {
	mods, err := ctx.LoadModule(h, "SourcesRaw")
	if err != nil {
		return fmt.Errorf("loading identity sources: %w", err)
	}
	loaded, _ := mods.(map[string]any)
	names := make([]string, 0, len(loaded))
	for name := range loaded {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		src, ok := loaded[name].(caller.Source)
		if !ok {
			return fmt.Errorf("identity source %s is not one: it does not name callers", name)
		}
		if a, ok := src.(*anonymous.Source); ok {
			h.anonymousTier = a.Tier
		}
		h.moreSources = append(h.moreSources, src)
	}
	if h.Anonymous != "" {
		if h.anonymousTier != "" {
			return fmt.Errorf("anonymous callers are given a tier twice: by anonymous %s and by the source anonymous", h.Anonymous)
		}
		h.anonymousTier = h.Anonymous
		h.moreSources = append(h.moreSources, &anonymous.Source{Tier: h.Anonymous})
	}
	return nil
}
