package vigthoria

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/keystore"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// budgetPrefix names a caller's budget account in the limiter: a quota
// of micro-units of the currency beside the caller's own limits.
const budgetPrefix = "budget:"

// readPrefix names a caller's reading account in the limiter: a request
// bucket of its tier's size (and concurrency, for GET /v1/models) for
// reading its own standing and models. Apart from its own account, a
// read is never refused for a quota, budget or token bucket the caller
// spent, nor takes from the requests its chats may make; and the
// limiter keeps one set of limits per account, which the account's
// other requests (with every limit) need.
const readPrefix = "read:"

// ledgerCounter reads what a client used of its quota from the ledger,
// so that quotas and budgets survive a restart: tokens for a client,
// cost for its budget account.
type ledgerCounter struct{ ledger *ledger.Ledger }

func (c ledgerCounter) QuotaUsed(ctx context.Context, client string, since time.Time) (int64, error) {
	if id, ok := strings.CutPrefix(client, budgetPrefix); ok {
		return c.ledger.CostUsed(ctx, id, since)
	}
	return c.ledger.QuotaUsed(ctx, client, since)
}

// maxSides bounds the accounts of one request: the caller's budget, and
// the limits and the budget of the key that minted its token.
const maxSides = 3

// A side is one account of the limiter that a request is admitted on,
// beside the caller's own limits.
type side struct {
	id       string
	who      keystore.Client // whose account: the caller, or the key that minted its token
	lim      *limiter.Limits
	d        limiter.Decision
	tierName string
	money    bool // a budget: reserves and settles cost, not tokens
	shared   bool // the minting key's: shared by all its users
}

// admission is an admitted request's standing with the limiter: its
// caller's own (the embedded Decision), and the other sides that bound
// it too: the key that minted its token, whose limits bound all of its
// users together, and the budgets of either. Every side is reserved and
// settled alike.
type admission struct {
	id  string // the caller's account: its ID, or its reading account's
	lim *limiter.Limits
	limiter.Decision

	sides [maxSides]side
	n     int
}

// admit admits a request of client under its tier's limits for the
// endpoint, and of the key that minted its token under that key's. A
// refusal by either is the caller's 429; a refusal by the key's limits
// frees what the caller's own took. Budgets join when the request's cost
// is known (reserve).
func (h *Handler) admit(w http.ResponseWriter, r *http.Request, client keystore.Client, tier *Tier, set limitSet, now time.Time) (admission, *proxy.APIError) {
	a := admission{id: client.ID, lim: tier.limitsFor(set)}
	if set.reads() {
		a.id = readPrefix + client.ID
	}
	d, err := h.limiter.Admit(r.Context(), a.id, a.lim, 0, now)
	if err != nil {
		return a, h.unavailable(w, a.id, err)
	}
	if d.Reason != limiter.Admitted {
		h.noteRefused(alerts.Quota, client, a.lim, &d, 0)
		return a, limitRefusal(w, tier, client.Tier, d, now)
	}
	a.Decision = d
	if tier.minter == nil {
		return a, nil
	}
	id := client.Minted.KeyID
	if set.reads() {
		id = readPrefix + id
	}
	if apiErr := h.join(w, r, &a, side{id: id, who: mintingKey(client), lim: tier.minter.limitsFor(set), tierName: client.Minted.KeyTier, shared: true}, 0, now); apiErr != nil {
		h.settleAdmission(r, client, &a, ledger.Tokens{})
		return a, apiErr
	}
	return a, nil
}

// mintingKey names the key that minted client's token, as an account.
func mintingKey(client keystore.Client) keystore.Client {
	return keystore.Client{ID: client.Minted.KeyID, Tier: client.Minted.KeyTier}
}

// join admits the request on one more side, reserving n (tokens, or
// micro-units for a budget). A side that refuses is not added.
func (h *Handler) join(w http.ResponseWriter, r *http.Request, a *admission, s side, n int64, now time.Time) *proxy.APIError {
	d, err := h.limiter.Admit(r.Context(), s.id, s.lim, n, now)
	if err != nil {
		return h.unavailable(w, s.id, err)
	}
	if d.Reason != limiter.Admitted {
		kind := alerts.Quota
		if s.money {
			kind = alerts.Budget
		}
		h.noteRefused(kind, s.who, s.lim, &d, n)
		return sideRefusal(w, &s, d, now)
	}
	s.d = d
	a.sides[a.n] = s
	a.n++
	return nil
}

// reserve adds a request's token estimate and highest possible cost to
// its admission, refusing it (with the caller's headers set) when a
// token limit, a quota or a budget would be passed, on any side. A model
// without a price is refused when a budget applies, unless unpriced is
// free: a budget never counts an answer as free by mistake.
func (h *Handler) reserve(w http.ResponseWriter, r *http.Request, client keystore.Client, tier *Tier, a *admission, model string, prompt, tokens int64, now time.Time) *proxy.APIError {
	budgets, nb := h.budgets(client, tier)
	if _, shared := h.limiter.(limiter.DeferredSettler); shared && a.n+nb > 0 {
		if p, priced := h.price(model); priced || nb == 0 {
			// The array by value: a slice of it would move it to the
			// heap on every path.
			return h.reserveAtOnce(w, r, client, tier, a, budgets, nb, p.cost(prompt, tokens-prompt), tokens, now)
		}
	}
	if refused, apiErr := h.reserveTokens(w, r, a.id, a.lim, &a.Decision, tokens, now); apiErr != nil {
		return apiErr
	} else if refused {
		h.noteRefused(alerts.Quota, client, a.lim, &a.Decision, tokens)
		return limitRefusal(w, tier, client.Tier, a.Decision, now)
	}
	for i := range a.n {
		s := &a.sides[i]
		if refused, apiErr := h.reserveTokens(w, r, s.id, s.lim, &s.d, tokens, now); apiErr != nil {
			return apiErr
		} else if refused {
			h.noteRefused(alerts.Quota, s.who, s.lim, &s.d, tokens)
			return sideRefusal(w, s, s.d, now)
		}
	}

	if nb == 0 {
		return nil
	}
	p, priced := h.price(model)
	if !priced {
		return errModelNotPriced(model)
	}
	cost := p.cost(prompt, tokens-prompt)
	for _, b := range budgets[:nb] {
		if apiErr := h.join(w, r, a, b, cost, now); apiErr != nil {
			return apiErr
		}
	}
	return nil
}

// budgets returns the budgets that bound a request of client: its own
// and the minting key's, the first n of the array.
func (h *Handler) budgets(client keystore.Client, tier *Tier) (b [2]side, n int) {
	if !tier.budget.Quota.Unlimited() {
		b[n] = side{id: budgetPrefix + client.ID, who: client, lim: &tier.budget, tierName: client.Tier, money: true}
		n++
	}
	if m := tier.minter; m != nil && !m.budget.Quota.Unlimited() {
		b[n] = side{id: budgetPrefix + client.Minted.KeyID, who: mintingKey(client), lim: &m.budget, tierName: client.Minted.KeyTier, money: true, shared: true}
		n++
	}
	return b, n
}

// reserveAtOnce is reserve for a limiter that shares its round trips
// (Redis): the caller's tokens, those of the key that minted its token
// and both budgets are asked at once, so that they go to Redis in one
// pipeline instead of a round trip each. Whatever passed is kept on the
// admission, even beside a refusal, so that the request's settle gives
// it back; the answer is the first refusal in reserve's order. The price
// is known: a budget of an unpriced model is reserve's own refusal.
func (h *Handler) reserveAtOnce(w http.ResponseWriter, r *http.Request, client keystore.Client, tier *Tier, a *admission, all [2]side, nb int, cost, tokens int64, now time.Time) *proxy.APIError {
	budgets := all[:nb]
	type result struct {
		d    limiter.Decision
		err  error
		none bool // no word from the limiter needed (see reserveTokens)
	}
	// What to ask, copied: the goroutines must not take the admission
	// (nor the budgets) to the heap on every path.
	type question struct {
		id     string
		lim    *limiter.Limits
		lease  limiter.Lease
		budget bool
	}
	var qs [1 + maxSides]question
	qs[0] = question{id: a.id, lim: a.lim, lease: a.Lease}
	for i := range a.n {
		s := &a.sides[i]
		qs[1+i] = question{id: s.id, lim: s.lim, lease: s.d.Lease}
	}
	for i := range budgets {
		qs[1+a.n+i] = question{id: budgets[i].id, lim: budgets[i].lim, budget: true}
	}
	var res [1 + maxSides]result
	ctx := r.Context()
	ask := func(i int) {
		q, res := &qs[i], &res[i]
		switch {
		case q.budget:
			res.d, res.err = h.limiter.Admit(ctx, q.id, q.lim, cost, now)
		case q.lim.Tokens.Unlimited() && q.lim.Quota.Unlimited():
			q.lease.Reserved += tokens
			res.d.Lease, res.none = q.lease, true
		default:
			res.d, res.err = h.limiter.Reserve(ctx, q.id, q.lim, q.lease, tokens, now)
		}
	}
	calls := 1 + a.n + len(budgets)
	var wg sync.WaitGroup
	for i := 1; i < calls; i++ {
		wg.Go(func() { ask(i) })
	}
	ask(0)
	wg.Wait()

	// Every lease first, so that the settle finds them all.
	sides := a.n
	a.Lease = res[0].d.Lease
	for i := range sides {
		a.sides[i].d.Lease = res[1+i].d.Lease
	}
	for i := range budgets {
		if rb := &res[1+sides+i]; rb.err == nil && rb.d.Reason == limiter.Admitted {
			b := budgets[i]
			b.d = rb.d
			a.sides[a.n] = b
			a.n++
		}
	}
	// Then the first refusal.
	if rc := &res[0]; !rc.none {
		if rc.err != nil {
			return h.unavailable(w, a.id, rc.err)
		}
		a.Reason, a.RetryAfter, a.State = rc.d.Reason, rc.d.RetryAfter, rc.d.State
		if rc.d.Reason != limiter.Admitted {
			h.noteRefused(alerts.Quota, client, a.lim, &a.Decision, tokens)
			return limitRefusal(w, tier, client.Tier, a.Decision, now)
		}
	}
	for i := range sides {
		s, rs := &a.sides[i], &res[1+i]
		if rs.none {
			continue
		}
		if rs.err != nil {
			return h.unavailable(w, s.id, rs.err)
		}
		s.d.Reason, s.d.RetryAfter, s.d.State = rs.d.Reason, rs.d.RetryAfter, rs.d.State
		if rs.d.Reason != limiter.Admitted {
			h.noteRefused(alerts.Quota, s.who, s.lim, &s.d, tokens)
			return sideRefusal(w, s, s.d, now)
		}
	}
	for i := range budgets {
		b, rb := &budgets[i], &res[1+sides+i]
		if rb.err != nil {
			return h.unavailable(w, b.id, rb.err)
		}
		if rb.d.Reason != limiter.Admitted {
			h.noteRefused(alerts.Budget, b.who, b.lim, &rb.d, cost)
			return sideRefusal(w, b, rb.d, now)
		}
	}
	return nil
}

// reserveTokens reserves tokens for one side of an admission, d, which
// then holds the limiter's decision. A side without a token limit or a
// quota needs no word from the limiter: the estimate is only noted, for
// what leaving early costs.
func (h *Handler) reserveTokens(w http.ResponseWriter, r *http.Request, id string, lim *limiter.Limits, d *limiter.Decision, tokens int64, now time.Time) (refused bool, apiErr *proxy.APIError) {
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

// settleAdmission ends an admitted request in the limiter, on every
// side: what it used replaces its reservations, tokens on the limits'
// sides and its cost on the budgets', and its slots are freed.
func (h *Handler) settleAdmission(r *http.Request, client keystore.Client, a *admission, used ledger.Tokens) {
	h.settle(r, a.id, a.lim, a.Lease, used.Total())
	for i := range a.n {
		s := &a.sides[i]
		n := used.Total()
		if s.money {
			n = used.Cost
		}
		h.settle(r, s.id, s.lim, s.d.Lease, n)
	}
}

// sideRefusal is the 429 of a request that one of its other sides
// refused: the minting key's limits, shared by its users, or a budget.
func sideRefusal(w http.ResponseWriter, s *side, d limiter.Decision, now time.Time) *proxy.APIError {
	limiter.SetRefusalHeaders(w.Header(), s.lim, d, now)
	var e proxy.APIError
	if s.money {
		q := &s.lim.Quota
		what := "You exceeded the budget of tier " + s.tierName
		if d.QuotaUsed < q.N {
			what = "This request could cost more than is left of the budget of tier " + s.tierName +
				" (" + policy.FormatCost(q.N-d.QuotaUsed) + " left); a smaller request may still fit"
		}
		e = proxy.APIError{
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
	return &e
}

func errModelNotPriced(model string) *proxy.APIError {
	return &proxy.APIError{
		Status:  http.StatusBadRequest,
		Type:    proxy.TypeInvalidRequest,
		Code:    "model_not_priced",
		Message: "The model " + strconv.Quote(clip(model, 100)) + " has no price on this proxy, and your usage is bounded by a budget: ask its operator to price it.",
	}
}
