package vigthoria

import (
	"context"
	"fmt"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// usageLine is a ledger row as `caddy vigthoria usage` and GET
// /vigthoria/usage show it: one key's (or minted token user's) use of
// one model on one day (UTC), with the key's name.
type usageLine struct {
	Key              string `json:"key"`
	Name             string `json:"name,omitempty"`
	Day              string `json:"day"`
	Model            string `json:"model"`
	Requests         int64  `json:"requests"`
	PromptTokens     int64  `json:"prompt_tokens"`
	CachedTokens     int64  `json:"cached_tokens"`
	CompletionTokens int64  `json:"completion_tokens"`
	ReasoningTokens  int64  `json:"reasoning_tokens"`
	TotalTokens      int64  `json:"total_tokens"`
	// CostMicros is in micro-units of the proxy's currency, which the
	// store does not know: 0 for usage of unpriced models.
	CostMicros int64 `json:"cost_micros"`
}

// usageRange checks a range of days, from and to (YYYY-MM-DD, both
// included), filling in this month (UTC) at now for those not given.
func usageRange(from, to string, now time.Time) (string, string, error) {
	now = now.UTC()
	first := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	if from == "" {
		from = store.Day(first)
	}
	if to == "" {
		to = store.Day(first.AddDate(0, 1, -1))
	}
	for _, d := range []string{from, to} {
		if _, err := time.Parse(time.DateOnly, d); err != nil {
			return "", "", fmt.Errorf("%w: day '%s' is not YYYY-MM-DD", store.ErrInvalid, d)
		}
	}
	if from > to {
		return "", "", fmt.Errorf("%w: the range of days ends (%s) before it starts (%s)", store.ErrInvalid, to, from)
	}
	return from, to, nil
}

// usageLines returns the ledger's rows of the clients ids (default: every
// key in st) from day from to day to, both included, with the keys'
// names.
func usageLines(ctx context.Context, st store.Backend, ids []string, from, to string) ([]usageLine, error) {
	recs, err := st.List(ctx)
	if err != nil {
		return nil, err
	}
	names := make(map[string]string, len(recs))
	for _, r := range recs {
		names[r.ID] = r.Name
	}
	if len(ids) == 0 {
		for _, r := range recs {
			ids = append(ids, r.ID)
		}
	}
	lines := []usageLine{}
	for _, id := range ids {
		rows, err := st.UsageSince(ctx, id, from)
		if err != nil {
			return nil, err
		}
		for _, r := range rows {
			if r.Day > to {
				continue
			}
			lines = append(lines, usageLine{Key: id, Name: names[id], Day: r.Day, Model: r.Model, Requests: r.Requests,
				PromptTokens: r.PromptTokens, CachedTokens: r.CachedTokens, CompletionTokens: r.CompletionTokens,
				ReasoningTokens: r.ReasoningTokens, TotalTokens: r.TotalTokens(), CostMicros: r.Cost})
		}
	}
	return lines, nil
}
