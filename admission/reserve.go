package admission

import (
	"context"
	"sync"
	"time"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/limiter"
)

// Reserve adds a request's token estimate and highest possible cost to
// its admission, refusing it when a token limit, a quota or a budget
// would be passed, on any side. A model without a price is refused when
// a budget applies, unless unpriced is free: a budget never counts an
// answer as free by mistake.
func (ad *Admitter) Reserve(ctx context.Context, a *Admission, model string, prompt, tokens int64, now time.Time) *Refusal {
	budgets := ad.budgets(a)
	if _, shared := ad.Limiter.(limiter.DeferredSettler); shared && a.n+budgets.n > 0 {
		if p, priced := ad.Policy.Price(model); priced || budgets.n == 0 {
			// The array by value: a slice of it would move it to the
			// heap on every path.
			return ad.reserveAtOnce(ctx, a, budgets, p.Cost(prompt, tokens-prompt), tokens, now)
		}
	}
	if refused, f := ad.reserveTokens(ctx, a.id, a.lim, &a.Decision, tokens, now); f != nil {
		return f
	} else if refused {
		ad.noteRefused(alerts.Quota, a.client, a.lim, &a.Decision, tokens)
		return limitRefusal(a.tier, a.client.Tier, a.Decision)
	}
	for i := range a.n {
		s := &a.sides[i]
		if refused, f := ad.reserveTokens(ctx, s.id, s.lim, &s.d, tokens, now); f != nil {
			return f
		} else if refused {
			ad.noteRefused(alerts.Quota, s.who, s.lim, &s.d, tokens)
			return sideRefusal(s, s.d)
		}
	}

	if budgets.n == 0 {
		return nil
	}
	p, priced := ad.Policy.Price(model)
	if !priced {
		return &Refusal{Err: errModelNotPriced(model)}
	}
	cost := p.Cost(prompt, tokens-prompt)
	for _, b := range budgets.s[:budgets.n] {
		if f := ad.join(ctx, a, b, cost, now); f != nil {
			return f
		}
	}
	return nil
}

// budgetSides are the budgets that bound a request: the first n of s.
type budgetSides struct {
	s [2]side
	n int
}

// budgets returns the budgets that bound a request: its caller's own and
// the minting key's.
func (ad *Admitter) budgets(a *Admission) (b budgetSides) {
	client, tier := a.client, a.tier
	if lim := tier.BudgetLimits(); !lim.Quota.Unlimited() {
		b.s[b.n] = side{id: BudgetPrefix + client.ID, who: client, lim: lim, tierName: client.Tier, money: true}
		b.n++
	}
	if m := tier.Minter(); m != nil && !m.BudgetLimits().Quota.Unlimited() {
		b.s[b.n] = side{id: BudgetPrefix + client.Minted.KeyID, who: mintingKey(client), lim: m.BudgetLimits(), tierName: client.Minted.KeyTier, money: true, shared: true}
		b.n++
	}
	return b
}

// reserveAtOnce is Reserve for a limiter that shares its round trips
// (Redis): the caller's tokens, those of the key that minted its token
// and both budgets are asked at once, so that they go to Redis in one
// pipeline instead of a round trip each. Whatever passed is kept on the
// admission, even beside a refusal, so that the request's settle gives
// it back; the answer is the first refusal in Reserve's order. The price
// is known: a budget of an unpriced model is Reserve's own refusal.
func (ad *Admitter) reserveAtOnce(ctx context.Context, a *Admission, all budgetSides, cost, tokens int64, now time.Time) *Refusal {
	budgets := all.s[:all.n]
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
	ask := func(i int) {
		q, res := &qs[i], &res[i]
		switch {
		case q.budget:
			res.d, res.err = ad.Limiter.Admit(ctx, q.id, q.lim, cost, now)
		case q.lim.Tokens.Unlimited() && q.lim.Quota.Unlimited():
			q.lease.Reserved += tokens
			res.d.Lease, res.none = q.lease, true
		default:
			res.d, res.err = ad.Limiter.Reserve(ctx, q.id, q.lim, q.lease, tokens, now)
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
			return ad.unavailable(a.id, rc.err)
		}
		a.Reason, a.RetryAfter, a.State = rc.d.Reason, rc.d.RetryAfter, rc.d.State
		if rc.d.Reason != limiter.Admitted {
			ad.noteRefused(alerts.Quota, a.client, a.lim, &a.Decision, tokens)
			return limitRefusal(a.tier, a.client.Tier, a.Decision)
		}
	}
	for i := range sides {
		s, rs := &a.sides[i], &res[1+i]
		if rs.none {
			continue
		}
		if rs.err != nil {
			return ad.unavailable(s.id, rs.err)
		}
		s.d.Reason, s.d.RetryAfter, s.d.State = rs.d.Reason, rs.d.RetryAfter, rs.d.State
		if rs.d.Reason != limiter.Admitted {
			ad.noteRefused(alerts.Quota, s.who, s.lim, &s.d, tokens)
			return sideRefusal(s, s.d)
		}
	}
	for i := range budgets {
		b, rb := &budgets[i], &res[1+sides+i]
		if rb.err != nil {
			return ad.unavailable(b.id, rb.err)
		}
		if rb.d.Reason != limiter.Admitted {
			ad.noteRefused(alerts.Budget, b.who, b.lim, &rb.d, cost)
			return sideRefusal(b, rb.d)
		}
	}
	return nil
}

// reserveTokens reserves tokens for one side of an admission, d, which
// then holds the limiter's decision. A side without a token limit or a
// quota needs no word from the limiter: the estimate is only noted, for
// what leaving early costs.
func (ad *Admitter) reserveTokens(ctx context.Context, id string, lim *limiter.Limits, d *limiter.Decision, tokens int64, now time.Time) (refused bool, f *Refusal) {
	if lim.Tokens.Unlimited() && lim.Quota.Unlimited() {
		d.Lease.Reserved += tokens
		return false, nil
	}
	rd, err := ad.Limiter.Reserve(ctx, id, lim, d.Lease, tokens, now)
	d.Lease = rd.Lease
	if err != nil {
		return false, ad.unavailable(id, err)
	}
	d.Reason, d.RetryAfter, d.State = rd.Reason, rd.RetryAfter, rd.State
	return rd.Reason != limiter.Admitted, nil
}
