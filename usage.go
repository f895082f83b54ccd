package vigthoria

import (
	"encoding/json"
	"net/http"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/keystore"
	"github.com/vigthoria/caddy-vigthoria/limiter"
)

// usageReport is the answer of GET /v1/usage: the caller's own usage and
// limits, never the upstream's organisation-wide figures. Counts are named
// like the API's usage object.
type usageReport struct {
	Object   string        `json:"object"` // "usage"
	ClientID string        `json:"client_id"`
	Tier     string        `json:"tier"`
	Today    usagePeriod   `json:"today"`
	Month    usagePeriod   `json:"month"`
	Limits   limitsReport  `json:"limits"`
	ByModel  []modelReport `json:"by_model"` // this month
}

type usageCounts struct {
	Requests         int64 `json:"requests"`
	PromptTokens     int64 `json:"prompt_tokens"`
	CompletionTokens int64 `json:"completion_tokens"`
	TotalTokens      int64 `json:"total_tokens"`
}

func (c *usageCounts) add(r keystore.UsageRow) {
	c.Requests += r.Requests
	c.PromptTokens += r.PromptTokens
	c.CompletionTokens += r.CompletionTokens
	c.TotalTokens += r.TotalTokens()
}

type usagePeriod struct {
	Start string `json:"start"` // YYYY-MM-DD, UTC
	usageCounts
}

type modelReport struct {
	Model string `json:"model"`
	usageCounts
}

type limitsReport struct {
	Requests   *bucketReport `json:"requests,omitempty"`
	Tokens     *bucketReport `json:"tokens,omitempty"`
	Concurrent *struct {
		Limit    int `json:"limit"`
		InFlight int `json:"in_flight"`
	} `json:"concurrent,omitempty"`
	Quota *quotaReport `json:"quota,omitempty"`
}

type bucketReport struct {
	Limit     int64  `json:"limit"`
	Remaining int64  `json:"remaining"`
	Reset     string `json:"reset"` // until full, as in x-ratelimit-reset-*
}

type quotaReport struct {
	Period    string    `json:"period"`
	Limit     int64     `json:"limit"`
	Used      int64     `json:"used"`
	Remaining int64     `json:"remaining"`
	Reset     time.Time `json:"reset"`
}

// serveUsage answers GET /v1/usage from the ledger and the limiter.
func (h *Handler) serveUsage(w http.ResponseWriter, r *http.Request, client keystore.Client, tier *Tier, now time.Time) error {
	monthStart := limiter.Month.Start(now)
	rows, err := h.keys.Ledger().UsageSince(r.Context(), client.ID, monthStart)
	if err == nil {
		var state limiter.State
		if state, err = h.limiter.State(r.Context(), client.ID, &tier.limits, now); err == nil {
			return h.writeUsage(w, client, tier, rows, state, monthStart, now)
		}
	}
	h.logger.Error("reading usage", zap.String("client_id", client.ID), zap.Error(err))
	errUnavailable.Write(w)
	return nil
}

// writeUsage writes the usage report of a client.
func (h *Handler) writeUsage(w http.ResponseWriter, client keystore.Client, tier *Tier, rows []keystore.UsageRow, state limiter.State, monthStart, now time.Time) error {

	rep := usageReport{
		Object: "usage", ClientID: client.ID, Tier: client.Tier,
		Today:   usagePeriod{Start: keystore.Day(now)},
		Month:   usagePeriod{Start: keystore.Day(monthStart)},
		ByModel: []modelReport{},
	}
	models := make(map[string]*modelReport)
	for _, row := range rows {
		rep.Month.add(row)
		if row.Day == rep.Today.Start {
			rep.Today.add(row)
		}
		m := models[row.Model]
		if m == nil {
			m = &modelReport{Model: row.Model}
			models[row.Model] = m
		}
		m.add(row)
	}
	for _, m := range models {
		rep.ByModel = append(rep.ByModel, *m)
	}
	sort.Slice(rep.ByModel, func(i, j int) bool { return rep.ByModel[i].Model < rep.ByModel[j].Model })

	lim := &tier.limits
	if !lim.Requests.Unlimited() {
		rep.Limits.Requests = &bucketReport{Limit: lim.Requests.Capacity(), Remaining: state.RequestsRemaining, Reset: limiter.FormatReset(state.RequestsReset)}
	}
	if !lim.Tokens.Unlimited() {
		rep.Limits.Tokens = &bucketReport{Limit: lim.Tokens.Capacity(), Remaining: state.TokensRemaining, Reset: limiter.FormatReset(state.TokensReset)}
	}
	if lim.Concurrent > 0 {
		rep.Limits.Concurrent = &struct {
			Limit    int `json:"limit"`
			InFlight int `json:"in_flight"`
		}{lim.Concurrent, state.InFlight}
	}
	if !lim.Quota.Unlimited() {
		rep.Limits.Quota = &quotaReport{
			Period: lim.Quota.Period.String(), Limit: lim.Quota.N, Used: state.QuotaUsed,
			Remaining: max(lim.Quota.N-state.QuotaUsed, 0), Reset: state.QuotaReset,
		}
	}
	limiter.SetHeaders(w.Header(), lim, state, now)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(rep)
}
