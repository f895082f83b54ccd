package admission

import (
	"net/http"
	"strconv"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
)

// limitRefusal is the 429 of a request a limit of its caller's tier
// refused, reporting the caller's standing.
func limitRefusal(tier *policy.Tier, tierName string, d limiter.Decision) *Refusal {
	return &Refusal{Err: refusal(d, tier.Limits(), tierName), Standing: tier.Limits(), Refused: tier.Limits(), Decision: d}
}

// refusal is the 429 for a request a limit of lim refused.
func refusal(d limiter.Decision, lim *limiter.Limits, tier string) *api.Error {
	e := &api.Error{Status: http.StatusTooManyRequests, Code: "rate_limit_exceeded"}
	wait := " Please try again in " + strconv.Itoa(api.RetrySeconds(d.RetryAfter)) + "s."
	switch d.Reason {
	case limiter.RequestLimit:
		e.Type = "requests"
		e.Message = "Rate limit reached for requests on tier " + tier + "." + wait
	case limiter.TokenLimit:
		e.Type = "tokens"
		e.Message = "Rate limit reached for tokens on tier " + tier + "." + wait
	case limiter.ConcurrencyLimit:
		e.Type = "requests"
		e.Message = "Too many requests in flight at once on tier " + tier + "." + wait
	case limiter.QuotaLimit:
		e.Type, e.Code = "insufficient_quota", "insufficient_quota"
		e.Message = "You exceeded your tier's token quota (" + tier + ")."
		if q := &lim.Quota; d.QuotaUsed < q.N {
			// Its reservation did not fit: a smaller one may.
			e.Message = "This request could use more tokens than are left of your tier's token quota (" + tier + ": " +
				strconv.FormatInt(q.N-d.QuotaUsed, 10) + " of " + strconv.FormatInt(q.N, 10) + " left); a smaller request may still fit."
		}
		e.Message += " It renews at the start of the next period; see GET /v1/usage."
	case limiter.TooLarge:
		e.Type, e.Code = "tokens", "request_too_large"
		e.Message = "This request asks more tokens than tier " + tier + " allows per window."
	}
	return e
}

// sideRefusal is the 429 of a request that one of its other sides
// refused: the minting key's limits, shared by its users, or a budget.
func sideRefusal(s *side, d limiter.Decision) *Refusal {
	var e api.Error
	if s.money {
		q := &s.lim.Quota
		what := "You exceeded the budget of tier " + s.tierName
		if d.QuotaUsed < q.N {
			what = "This request could cost more than is left of the budget of tier " + s.tierName +
				" (" + policy.FormatCost(q.N-d.QuotaUsed) + " left); a smaller request may still fit"
		}
		e = api.Error{
			Status: http.StatusTooManyRequests, Type: "insufficient_quota", Code: "insufficient_quota",
			Message: what + " (" + policy.FormatCost(q.N) + " a " + q.Period.String() +
				"). It renews at the start of the next period; see GET /v1/usage.",
		}
	} else {
		e = *refusal(d, s.lim, s.tierName)
	}
	if s.shared {
		e.Message += " These limits are shared by every user of the app that signed you in."
	}
	return &Refusal{Err: &e, Refused: s.lim, Decision: d}
}

func errModelNotPriced(model string) *api.Error {
	return &api.Error{
		Status:  http.StatusBadRequest,
		Type:    api.TypeInvalidRequest,
		Code:    "model_not_priced",
		Message: "The model " + strconv.Quote(api.Clip(model, 100)) + " has no price on this proxy, and your usage is bounded by a budget: ask its operator to price it.",
	}
}
