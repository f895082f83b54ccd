package vigthoria

import (
	"encoding/json"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/admission"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// usageReport is the answer of GET /v1/usage: the caller's own usage and
// limits, never the upstream's organisation-wide figures. Counts are named
// like the API's usage object.
type usageReport struct {
	Object   string `json:"object"` // "usage"
	ClientID string `json:"client_id"`
	Tier     string `json:"tier"`
	// MintedBy is the key that minted the caller's token, whose own usage
	// includes the caller's.
	MintedBy string        `json:"minted_by,omitempty"`
	Today    usagePeriod   `json:"today"`
	Month    usagePeriod   `json:"month"`
	Limits   limitsReport  `json:"limits"`
	ByModel  []modelReport `json:"by_model"` // this month
}

// usageCounts are a sum of ledger rows, shaped like the API's usage
// object. The details are there when the upstream reported any.
type usageCounts struct {
	Requests          int64              `json:"requests"`
	PromptTokens      int64              `json:"prompt_tokens"`
	CompletionTokens  int64              `json:"completion_tokens"`
	TotalTokens       int64              `json:"total_tokens"`
	PromptDetails     *promptDetails     `json:"prompt_tokens_details,omitempty"`
	CompletionDetails *completionDetails `json:"completion_tokens_details,omitempty"`
	Cost              *costReport        `json:"cost,omitempty"` // when prices are configured
}

// costReport is a cost: {"amount": "1.234567", "currency": "USD"}. The
// amount is a decimal string with six places, exact to the micro-unit
// the ledger counts in: a JSON number would be read as a float by most
// clients (JavaScript's Number above all), and sums of floats drift.
type costReport struct {
	Amount   string `json:"amount"`
	Currency string `json:"currency"`
}

type promptDetails struct {
	CachedTokens int64 `json:"cached_tokens"`
}

type completionDetails struct {
	ReasoningTokens int64 `json:"reasoning_tokens"`
}

// countsOf shapes a sum of rows; details adds the details when they are
// zero too. Its cost is there when currency is not "".
func countsOf(sum store.UsageRow, details bool, currency string) usageCounts {
	c := usageCounts{
		Requests: sum.Requests, PromptTokens: sum.PromptTokens,
		CompletionTokens: sum.CompletionTokens, TotalTokens: sum.TotalTokens(),
	}
	if details || sum.CachedTokens > 0 {
		c.PromptDetails = &promptDetails{sum.CachedTokens}
	}
	if details || sum.ReasoningTokens > 0 {
		c.CompletionDetails = &completionDetails{sum.ReasoningTokens}
	}
	if currency != "" {
		c.Cost = &costReport{Amount: policy.FormatCost(sum.Cost), Currency: currency}
	}
	return c
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
	Quota  *quotaReport  `json:"quota,omitempty"`
	Budget *budgetReport `json:"budget,omitempty"`
}

// budgetReport is the caller's budget, its amounts shaped as costs.
type budgetReport struct {
	Period    string     `json:"period"`
	Limit     costReport `json:"limit"`
	Used      costReport `json:"used"`
	Remaining costReport `json:"remaining"`
	Reset     time.Time  `json:"reset"`
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

// serveUsage answers GET /v1/usage from the limiter and the ledger, in
// that order: a request is in the ledger before its slot is let go
// (settle), so a report that shows it no longer in flight counts it.
// Read the other way round, a request that ended between the two reads
// would be neither.
func (x *exchange) serveUsage() error {
	h, w, r, now, client, tier := x.h, x.w, x.r, x.now, x.client, x.policy
	state, err := h.limiter.State(r.Context(), client.ID, tier.Limits(), now)
	var budget limiter.State
	if err == nil && !tier.BudgetLimits().Quota.Unlimited() {
		budget, err = h.limiter.State(r.Context(), admission.BudgetPrefix+client.ID, tier.BudgetLimits(), now)
	}
	var rows []store.UsageRow
	if err == nil {
		rows, err = h.keys.Ledger().UsageSince(r.Context(), client.ID, limiter.Month.Start(now))
	}
	if err == nil {
		rep := x.reportUsage(rows, state, budget)
		limiter.SetHeaders(w.Header(), tier.Limits(), state, now)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		return json.NewEncoder(w).Encode(rep)
	}
	h.logger.Error("reading usage", zap.String("client_id", client.ID), zap.Error(err))
	admission.ErrUnavailable.Write(w)
	return nil
}

// reportUsage is the report of the caller from its ledger rows of
// this month, its state under its tier's limits and its budget's.
func (x *exchange) reportUsage(rows []store.UsageRow, state, budget limiter.State) usageReport {
	h, client, tier, now := x.h, x.client, x.policy, x.now
	monthStart := limiter.Month.Start(now)
	rep := usageReport{
		Object: "usage", ClientID: client.ID, Tier: client.Tier,
		Today:   usagePeriod{Start: store.Day(now)},
		Month:   usagePeriod{Start: store.Day(monthStart)},
		ByModel: []modelReport{},
	}
	if client.Minted != nil {
		rep.MintedBy = client.Minted.KeyID
	}
	// Sums of rows saturate, as the ledger's own do.
	var today, month store.UsageRow
	models := make(map[string]*store.UsageRow)
	for _, row := range rows {
		month.Add(row)
		if row.Day == rep.Today.Start {
			today.Add(row)
		}
		m := models[row.Model]
		if m == nil {
			m = new(store.UsageRow)
			models[row.Model] = m
		}
		m.Add(row)
	}
	// Costs are reported when prices are configured: without, every
	// cost is 0 and says nothing.
	var currency string
	if h.policy.Priced() {
		currency = h.Currency
	}
	rep.Today.usageCounts, rep.Month.usageCounts = countsOf(today, true, currency), countsOf(month, true, currency)
	for model, sum := range models {
		rep.ByModel = append(rep.ByModel, modelReport{Model: model, usageCounts: countsOf(*sum, false, currency)})
	}
	sort.Slice(rep.ByModel, func(i, j int) bool { return rep.ByModel[i].Model < rep.ByModel[j].Model })

	lim := tier.Limits()
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
	if b := tier.BudgetLimits().Quota; !b.Unlimited() {
		money := func(n int64) costReport { return costReport{Amount: policy.FormatCost(n), Currency: h.Currency} }
		rep.Limits.Budget = &budgetReport{
			Period: b.Period.String(), Limit: money(b.N), Used: money(budget.QuotaUsed),
			Remaining: money(max(b.N-budget.QuotaUsed, 0)), Reset: budget.QuotaReset,
		}
	}
	return rep
}
