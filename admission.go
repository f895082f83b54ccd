package vigthoria

import (
	"net/http"
	"time"

	"github.com/vigthoria/caddy-vigthoria/keystore"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// admission is an admitted request's standing with the limiter: its
// caller's own and, for the user of a minted token, the minting key's
// too, whose limits bound all of its users together. Both are reserved
// and settled alike.
type admission struct {
	lim *limiter.Limits
	limiter.Decision

	parent     *Tier // the minting key's tier, with its settings; nil for other callers
	parentLim  *limiter.Limits
	parentSide limiter.Decision
}

// admit admits a request of client under lim, its tier's limits for the
// endpoint, and of the key that minted its token under that key's. A
// refusal by either is the caller's 429; a refusal by the key's limits
// frees what the caller's own took.
func (h *Handler) admit(w http.ResponseWriter, r *http.Request, client keystore.Client, tier *Tier, usage bool, now time.Time) (admission, *proxy.APIError) {
	a := admission{lim: &tier.limits}
	if usage {
		a.lim = &tier.usageLimits
	}
	d, err := h.limiter.Admit(r.Context(), client.ID, a.lim, 0, now)
	if err != nil {
		return a, h.unavailable(w, client.ID, err)
	}
	if d.Reason != limiter.Admitted {
		return a, limitRefusal(w, tier, client.Tier, d, now)
	}
	a.Decision = d
	if client.Minted == nil {
		return a, nil
	}
	a.parent = h.tierFor(client.Minted.KeyTier, h.keys.Settings(client.Minted.KeyID))
	if a.parent == nil {
		h.settle(r, client.ID, a.lim, a.Lease, 0)
		return a, errTierNotConfigured
	}
	a.parentLim = &a.parent.limits
	if usage {
		a.parentLim = &a.parent.usageLimits
	}
	pd, err := h.limiter.Admit(r.Context(), client.Minted.KeyID, a.parentLim, 0, now)
	if err == nil && pd.Reason == limiter.Admitted {
		a.parentSide = pd
		return a, nil
	}
	h.settle(r, client.ID, a.lim, a.Lease, 0)
	if err != nil {
		return a, h.unavailable(w, client.Minted.KeyID, err)
	}
	return a, parentRefusal(w, a.parent, client.Minted.KeyTier, pd, now)
}

// reserve adds a request's token estimate to its admission, refusing it
// (with the caller's headers set) when a token limit or the quota would
// be passed, on the caller's side or the minting key's.
func (h *Handler) reserve(w http.ResponseWriter, r *http.Request, client keystore.Client, tier *Tier, a *admission, tokens int64, now time.Time) *proxy.APIError {
	if refused, apiErr := h.reserveSide(w, r, client.ID, a.lim, &a.Decision, tokens, now); apiErr != nil {
		return apiErr
	} else if refused {
		return limitRefusal(w, tier, client.Tier, a.Decision, now)
	}
	if a.parent == nil {
		return nil
	}
	if refused, apiErr := h.reserveSide(w, r, client.Minted.KeyID, a.parentLim, &a.parentSide, tokens, now); apiErr != nil {
		return apiErr
	} else if refused {
		return parentRefusal(w, a.parent, client.Minted.KeyTier, a.parentSide, now)
	}
	return nil
}

// reserveSide reserves tokens for one side of an admission, d, which
// then holds the limiter's decision. A side without a token limit or a
// quota needs no word from the limiter: the estimate is only noted, for
// what leaving early costs.
func (h *Handler) reserveSide(w http.ResponseWriter, r *http.Request, id string, lim *limiter.Limits, d *limiter.Decision, tokens int64, now time.Time) (refused bool, apiErr *proxy.APIError) {
	if lim.Tokens.Unlimited() && lim.Quota.Unlimited() {
		d.Lease.Reserved += tokens
		return false, nil
	}
	rd, err := h.limiter.Reserve(r.Context(), id, lim, d.Lease, tokens, now)
	d.Lease = rd.Lease
	if err != nil {
		return false, h.unavailable(w, id, err)
	}
	d.Reason, d.RetryAfter, d.State = rd.Reason, rd.RetryAfter, rd.State
	return rd.Reason != limiter.Admitted, nil
}

// settleAdmission ends an admitted request in the limiter, on both sides: used
// replaces its reservations and its slots are freed.
func (h *Handler) settleAdmission(r *http.Request, client keystore.Client, a *admission, used int64) {
	h.settle(r, client.ID, a.lim, a.Lease, used)
	if a.parent != nil {
		h.settle(r, client.Minted.KeyID, a.parentLim, a.parentSide.Lease, used)
	}
}

// parentRefusal is the 429 of a request that the limits of the key that
// minted its token refused: that key's users share them.
func parentRefusal(w http.ResponseWriter, tier *Tier, tierName string, d limiter.Decision, now time.Time) *proxy.APIError {
	e := *limitRefusal(w, tier, tierName, d, now)
	e.Message += " These limits are shared by every user of the app that signed you in."
	return &e
}
