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
// configs written for it keep working. It notes the anonymous source's
// tier, which the body shares need before the other sources are made.
func (h *Handler) loadSources(ctx caddy.Context) ([]caller.Source, error) {
	mods, err := ctx.LoadModule(h, "SourcesRaw")
	if err != nil {
		return nil, fmt.Errorf("loading identity sources: %w", err)
	}
	loaded, _ := mods.(map[string]any)
	names := make([]string, 0, len(loaded))
	for name := range loaded {
		names = append(names, name)
	}
	slices.Sort(names)
	var sources []caller.Source
	for _, name := range names {
		src, ok := loaded[name].(caller.Source)
		if !ok {
			return nil, fmt.Errorf("identity source %s is not one: it does not name callers", name)
		}
		if a, ok := src.(*anonymous.Source); ok {
			h.anonymousTier = a.Tier
		}
		sources = append(sources, src)
	}
	if h.Anonymous != "" {
		if h.anonymousTier != "" {
			return nil, fmt.Errorf("anonymous callers are given a tier twice: by anonymous %s and by the source anonymous", h.Anonymous)
		}
		h.anonymousTier = h.Anonymous
		sources = append(sources, &anonymous.Source{Tier: h.Anonymous})
	}
	return sources, nil
}
