// Package admission decides whether a request may go on under the
// limiter: it admits a request on every account that bounds it (its
// caller's, the key that minted its token, and the budgets of either),
// reserves its tokens and highest possible cost, and settles what it
// used on every one of them. It returns decisions, a Refusal when a
// request may not go on; it never writes HTTP.
//
// It may import limiter, policy, alerts, caller, ledger (for what a
// request used), proxy (for what an answer reported) and api.
package admission

import (
	"context"
	"errors"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
)

// BudgetPrefix names a caller's budget account in the limiter: a quota
// of micro-units of the currency beside the caller's own limits.
const BudgetPrefix = "budget:"

// ReadPrefix names a caller's reading account in the limiter: a request
// bucket of its tier's size (and concurrency, for GET /v1/models) for
// reading its own standing and models. Apart from its own account, a
// read is never refused for a quota, budget or token bucket the caller
// spent, nor takes from the requests its chats may make; and the
// limiter keeps one set of limits per account, which the account's
// other requests (with every limit) need.
const ReadPrefix = "read:"

// ErrUnavailable answers when the proxy cannot decide for lack of its
// store, and its policy is to refuse rather than guess.
var ErrUnavailable = &api.Error{
	Status:  http.StatusServiceUnavailable,
	Type:    api.TypeAPI,
	Code:    "proxy_unavailable",
	Message: "The proxy cannot check your limits right now. Please try again shortly.",
}

// Admitter admits, reserves and settles requests on a limiter.
type Admitter struct {
	Limiter  limiter.Limiter
	Policy   *policy.Policy   // prices
	Notifier *alerts.Notifier // quota and budget figures
	Logger   *zap.Logger
}

// maxSides bounds the accounts of one request: the caller's budget, and
// the limits and the budget of the key that minted its token.
const maxSides = 3

// A side is one account of the limiter that a request is admitted on,
// beside the caller's own limits.
type side struct {
	id       string
	who      caller.Client // whose account: the caller, or the key that minted its token
	lim      *limiter.Limits
	d        limiter.Decision
	tierName string
	money    bool // a budget: reserves and settles cost, not tokens
	shared   bool // the minting key's: shared by all its users
}

// Admission is an admitted request's standing with the limiter: its
// caller's own (the embedded Decision), and the other sides that bound
// it too: the key that minted its token, whose limits bound all of its
// users together, and the budgets of either. Every side is reserved and
// settled alike.
type Admission struct {
	id     string // the caller's account: its ID, or its reading account's
	lim    *limiter.Limits
	client caller.Client
	tier   *policy.Tier
	limiter.Decision

	sides [maxSides]side
	n     int

	// upstream, when not nil, is the queue whose upstream account the
	// request holds upLease on (JoinUpstream).
	upstream *Queue
	upLease  limiter.Lease
}

// Limits are the limits the request was admitted under, for its headers.
func (a *Admission) Limits() *limiter.Limits { return a.lim }

// A Refusal is a decision not to let a request go on: its answer, and
// the limit headers that go with it.
type Refusal struct {
	Err *api.Error
	// Standing, when not nil, are the limits whose standing (State) the
	// answer reports; Refused, when not nil, the limits that refused it,
	// as Decision decided.
	Standing, Refused *limiter.Limits
	limiter.Decision
}

// Admit admits a request of client under its tier's limits of set, and
// of the key that minted its token under that key's. A refusal by either
// is the caller's 429; a refusal by the key's limits frees what the
// caller's own took. Budgets join when the request's cost is known
// (Reserve).
func (ad *Admitter) Admit(ctx context.Context, client caller.Client, tier *policy.Tier, set policy.LimitSet, now time.Time) (Admission, *Refusal) {
	a := Admission{id: client.ID, lim: tier.LimitsFor(set), client: client, tier: tier}
	if set.Reads() {
		a.id = ReadPrefix + client.ID
	}
	d, err := ad.Limiter.Admit(ctx, a.id, a.lim, 0, now)
	if err != nil {
		return a, ad.unavailable(a.id, err)
	}
	if d.Reason != limiter.Admitted {
		ad.noteRefused(alerts.Quota, client, a.lim, &d, 0)
		return a, limitRefusal(tier, client.Tier, d)
	}
	a.Decision = d
	m := tier.Minter()
	if m == nil {
		return a, nil
	}
	id := client.Minted.KeyID
	if set.Reads() {
		id = ReadPrefix + id
	}
	s := side{id: id, who: mintingKey(client), lim: m.LimitsFor(set), tierName: client.Minted.KeyTier, shared: true}
	if f := ad.join(ctx, &a, s, 0, now); f != nil {
		ad.Settle(ctx, &a, ledger.Tokens{})
		return a, f
	}
	return a, nil
}

// mintingKey names the key that minted client's token, as an account.
func mintingKey(client caller.Client) caller.Client {
	return caller.Client{ID: client.Minted.KeyID, Tier: client.Minted.KeyTier}
}

// join admits the request on one more side, reserving n (tokens, or
// micro-units for a budget). A side that refuses is not added.
func (ad *Admitter) join(ctx context.Context, a *Admission, s side, n int64, now time.Time) *Refusal {
	d, err := ad.Limiter.Admit(ctx, s.id, s.lim, n, now)
	if err != nil {
		return ad.unavailable(s.id, err)
	}
	if d.Reason != limiter.Admitted {
		kind := alerts.Quota
		if s.money {
			kind = alerts.Budget
		}
		ad.noteRefused(kind, s.who, s.lim, &d, n)
		return sideRefusal(&s, d)
	}
	s.d = d
	a.sides[a.n] = s
	a.n++
	return nil
}

// Settle ends an admitted request in the limiter, on every side: what it
// used replaces its reservations, tokens on the limits' sides and its
// cost on the budgets', and its slots are freed.
func (ad *Admitter) Settle(ctx context.Context, a *Admission, used ledger.Tokens) {
	ad.settle(ctx, a.id, a.lim, a.Lease, used.Total())
	for i := range a.n {
		s := &a.sides[i]
		n := used.Total()
		if s.money {
			n = used.Cost
		}
		ad.settle(ctx, s.id, s.lim, s.d.Lease, n)
	}
	if q := a.upstream; q != nil {
		a.upstream = nil
		q.Settle(ctx, a.upLease, used.Total())
	}
}

// settle ends an admitted request in the limiter on one account: used
// replaces its reservation and its slot is freed.
func (ad *Admitter) settle(ctx context.Context, id string, lim *limiter.Limits, lease limiter.Lease, used int64) {
	if d, ok := ad.Limiter.(limiter.DeferredSettler); ok {
		// Redis: the caller does not wait for it, and the instance's
		// next call to Redis comes after it.
		d.SettleDeferred(id, lim, lease, used, time.Now())
		return
	}
	if err := ad.Limiter.Settle(context.WithoutCancel(ctx), id, lim, lease, used, time.Now()); err != nil {
		ad.Logger.Error("settling usage", zap.String("client_id", id), zap.Error(err))
	}
}

// unavailable is the 503 of a request whose limits could not be decided.
func (ad *Admitter) unavailable(id string, err error) *Refusal {
	if !errors.Is(err, limiter.ErrUnavailable) {
		ad.Logger.Error("deciding limits", zap.String("client_id", id), zap.Error(err))
	}
	e := *ErrUnavailable
	e.RetryAfter = 1
	return &Refusal{Err: &e}
}
