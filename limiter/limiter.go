package limiter

import (
	"context"
	"errors"
	"time"
)

// Limits are one tier's limits. A zero field sets no limit, so the zero
// Limits admits everything.
type Limits struct {
	Requests   Rate  // requests per window
	Tokens     Rate  // prompt and completion tokens per window
	Concurrent int   // requests in flight at once
	Quota      Quota // tokens per calendar day or month
	// NoSlot admits requests that are never in flight: they count
	// against the other limits but take no concurrency slot, not even
	// for a moment (GET /v1/usage, which answers at once). It is meant
	// for requests that reserve no tokens: their lease holds nothing, so
	// its Settle with nothing used costs nothing, not even a lookup.
	// Admit and Reserve refuse to reserve for them, with an error.
	NoSlot bool
}

// holdsNothing reports whether settling lease with used changes nothing:
// a request that took no slot and used what it reserved.
func (l Lease) holdsNothing(lim *Limits, used int64) bool {
	return lim.NoSlot && used == l.Reserved
}

// Period is the calendar period of a quota, in UTC.
type Period uint8

const (
	Day Period = iota + 1
	Month
)

// Start returns the start of the period holding t, in UTC.
func (p Period) Start(t time.Time) time.Time {
	y, m, d := t.UTC().Date()
	if p == Month {
		d = 1
	}
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}

// End returns the end of the period holding t: the next one's start.
func (p Period) End(t time.Time) time.Time {
	s := p.Start(t)
	if p == Month {
		return s.AddDate(0, 1, 0)
	}
	return s.AddDate(0, 0, 1)
}

func (p Period) String() string {
	switch p {
	case Day:
		return "day"
	case Month:
		return "month"
	}
	return "none"
}

// Quota is a number of tokens allowed per calendar period. The zero Quota
// is no limit.
type Quota struct {
	N      int64
	Period Period
}

// Unlimited reports whether q sets no limit.
func (q Quota) Unlimited() bool { return q.N <= 0 || q.Period == 0 }

// Reason names the limit that refused a request.
type Reason uint8

const (
	Admitted Reason = iota
	RequestLimit
	TokenLimit
	ConcurrencyLimit
	QuotaLimit
	// TooLarge is a request that asks more tokens than the tier's token
	// burst: no wait can admit it.
	TooLarge
)

func (r Reason) String() string {
	return [...]string{"admitted", "requests", "tokens", "concurrency", "quota", "too_large"}[r]
}

// State is a client's standing against its tier's limits, for headers and
// /v1/usage. Fields of a limit the tier does not set are zero.
type State struct {
	RequestsRemaining int64
	RequestsReset     time.Duration // until the request bucket is full
	TokensRemaining   int64
	TokensReset       time.Duration
	QuotaUsed         int64
	QuotaReset        time.Time // end of the current quota period
	InFlight          int
}

// Decision is what Admit or Reserve decided.
type Decision struct {
	Reason Reason // Admitted, or the limit that refused
	// RetryAfter is how long until the same request would be admitted;
	// negative when waiting cannot help (TooLarge).
	RetryAfter time.Duration
	// Lease is what an admitted request holds until Settle.
	Lease Lease
	State
}

// Lease is what an admitted request holds: its token reservation and, for
// a backend that needs it, the name of its concurrency slot.
type Lease struct {
	Reserved int64
	ID       string // "" for backends whose slots need no name
	// Period names the quota period the reservation counts in, so that
	// Settle corrects that period and never the next: for Memory its
	// start (unix nanoseconds), for Redis the time of admission (unix
	// milliseconds, Redis' clock); 0 for none.
	Period int64
	// Local is the part of Reserved that a Redis instance took from its
	// own slice of the client's token bucket (redis_slices.go); 0 for
	// every other lease.
	Local int64
}

// Limiter decides whether a client may make a request, and accounts for
// what it used. A backend is one implementation: in memory for one
// instance, Redis for a fleet.
type Limiter interface {
	// Admit checks every limit at now and, when all pass, counts one
	// request, reserves the estimated tokens against the token rate and
	// quota, and takes a concurrency slot. A refused request takes nothing.
	Admit(ctx context.Context, client string, lim *Limits, reserve int64, now time.Time) (Decision, error)

	// Reserve adds tokens to the reservation of an admitted request's
	// lease, so that a request can be admitted (reserve 0) before its body
	// is read, and reserve its estimate once it is. The tokens are checked
	// as Admit checks them, in the same order: TooLarge when the lease's
	// whole reservation would exceed the token burst, QuotaLimit, then
	// TokenLimit. Admit(0) then Reserve(r) admits exactly what Admit(r)
	// admits; only refusals differ, in what they took.
	//
	// The Decision's Lease is the lease to settle after the call, whatever
	// the decision and whatever the error, so that
	// d, err = l.Reserve(ctx, client, lim, d.Lease, n, now) always leaves
	// d.Lease right for Settle. When it passes, the tokens are
	// taken, the Lease's Reserved is grown by what the backend reserved and
	// the Decision is Admitted. When it refuses, nothing changes: the
	// request stays admitted (it was counted and holds its slot), the Lease
	// is the one given, RetryAfter and State are filled as in Admit's
	// refusals, and the caller settles the lease with what it used (0).
	// The lease goes in and out by value, as Settle takes it: a pointer
	// through the interface would move the caller's Decision to the heap.
	//
	// Call it only between the lease's Admit and its Settle, with tokens
	// >= 0. A backend that can tell (Redis) returns ErrLeaseGone for a
	// lease settled already.
	Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, now time.Time) (Decision, error)

	// Settle ends an admitted request: the tokens it really used replace
	// its reservation (a refund or an extra charge) and its slot is freed.
	// Every admitted request is settled exactly once, whatever happened.
	Settle(ctx context.Context, client string, lim *Limits, lease Lease, used int64, now time.Time) error

	// State returns the client's standing at now without changing it.
	State(ctx context.Context, client string, lim *Limits, now time.Time) (State, error)
}

// DeferredSettler is a Limiter that can settle without its caller
// waiting: a backend whose Settle waits on the network (Redis). A deferred
// settle counts as made when the call returns: every call made after it,
// on the same instance, sees it settled. Other instances may see it a few
// milliseconds late, holding the request's slot and reservation a little
// longer, never less. It is retried as Settle is when it fails.
type DeferredSettler interface {
	SettleDeferred(client string, lim *Limits, lease Lease, used int64, now time.Time)
}

// ErrLeaseGone is Reserve's error for a lease that was settled already, or
// that the backend lost: its Settle would not replace a reservation made
// now, so none is. The request must not go on.
var ErrLeaseGone = errors.New("the lease was settled already or lost")

// errNegativeReserve is Reserve's error for tokens < 0: a refund is
// Settle's, which knows what was used.
var errNegativeReserve = errors.New("limiter: negative token reservation")

// errNoSlotReserve is the error of a reservation for a request that takes
// no slot: nothing would show it in flight, and a backend may forget an
// account with nothing in flight, its reservations with it, so that they
// would never count. Such requests reserve nothing (see NoSlot).
var errNoSlotReserve = errors.New("limiter: a reservation for a request that takes no slot")

// checkReserve returns the error of a reservation that no backend takes.
func checkReserve(lim *Limits, tokens int64) error {
	switch {
	case tokens < 0:
		return errNegativeReserve
	case tokens > 0 && lim.NoSlot:
		return errNoSlotReserve
	}
	return nil
}

// tooLarge reports whether a request holding held tokens and asking more
// would hold more than the token burst: no wait can admit it.
func tooLarge(lim *Limits, held, more int64) bool {
	return !lim.Tokens.Unlimited() && float64(held+more) > lim.Tokens.burst()
}

// QuotaCounter tells how many tokens a client used since a time, so that a
// quota survives a restart. The usage ledger implements it.
type QuotaCounter interface {
	QuotaUsed(ctx context.Context, client string, since time.Time) (int64, error)
}
