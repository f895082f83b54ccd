package limiter

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// OnError says what a Fallback does while its shared backend fails.
type OnError uint8

const (
	// UseLocal decides with in-memory limits, per instance, until the
	// shared backend answers again.
	UseLocal OnError = iota
	// Deny refuses requests until the shared backend answers again.
	Deny
)

// ErrUnavailable is the error of a Fallback set to Deny while its shared
// backend fails.
var ErrUnavailable = errors.New("the shared limiter is unavailable")

// probeEvery is how long a Fallback leaves a failed shared backend alone
// before trying it again, so that an outage does not cost every request a
// timeout.
const probeEvery = time.Second

// Fallback puts a shared backend (Redis) first, within a tight timeout,
// and acts as told by OnError when it fails: in-memory limits, or
// refusals. It goes back to the shared backend by itself when that answers
// again, and logs each change of course once.
//
// The in-memory limits decide a quota from what the instance knows: the
// last figure a shared decision gave for the client in the period, noted
// in the local Memory as decisions pass, plus what the local limits
// counted themselves in the period, which the shared backend never
// learns. A client the instance has not seen in the period starts from
// the local Memory's QuotaCounter, so a Fallback over Redis wants a local
// Memory without one (the fleet's ledger is in Redis too, and reading it
// would wait on the store that failed): such a client then starts from
// zero. During outages an instance thus lets a client use at most what
// the quota leaves above the last figure it saw, and a client it has not
// seen in the period at most the whole quota.
//
// Use NewFallback; it is safe for concurrent use.
type Fallback struct {
	shared  Limiter
	local   *Memory
	policy  OnError
	timeout time.Duration
	logger  *zap.Logger

	downUntil atomic.Int64 // unix nanoseconds; 0: the shared backend is up
	// OnChange, when set, is called with true when the fallback starts and
	// false when it ends, for metrics.
	OnChange func(down bool)
}

// NewFallback returns a Fallback on shared, each call bounded by timeout.
// See Fallback on the QuotaCounter of local.
func NewFallback(shared Limiter, local *Memory, policy OnError, timeout time.Duration, logger *zap.Logger) *Fallback {
	return &Fallback{shared: shared, local: local, policy: policy, timeout: timeout, logger: logger}
}

// Admit implements Limiter.
func (f *Fallback) Admit(ctx context.Context, client string, lim *Limits, reserve int64, now time.Time) (Decision, error) {
	if err := checkReserve(lim, reserve); err != nil {
		return Decision{}, err // the caller's mistake, not the shared backend's failure
	}
	if f.up(now) {
		ctx, cancel := context.WithTimeout(ctx, f.timeout)
		d, err := f.shared.Admit(ctx, client, lim, reserve, now)
		cancel()
		if err == nil {
			if d.Lease.ID != sliceID { // a slice's admission did not ask Redis
				f.recovered()
			}
			f.noteQuota(client, lim, d.QuotaUsed, d.QuotaReset, now)
			return d, nil
		}
		f.failed(err, now)
	}
	if f.policy == Deny {
		return Decision{}, ErrUnavailable
	}
	return f.local.Admit(ctx, client, lim, reserve, now)
}

// Reserve implements Limiter. A lease from the shared backend (it names its
// slot) reserves there, and one from the local limits locally, since the
// lease's Settle goes to the same backend and must find the reservation
// there.
//
// When the shared backend fails, or is left alone after failing, a shared
// lease cannot reserve anywhere sound: the local limits do not hold this
// request's admission, and a reservation made there would be refunded to
// the shared backend by Settle. Under Deny the call fails with
// ErrUnavailable. Under UseLocal the reservation is admitted unchecked, but
// for TooLarge, which needs no state, and the lease is left as it is, so
// that Settle charges the shared backend all the request used: the
// request's tokens still count, they are only not checked in advance, as
// the requests that the local limits admit during the outage are not
// checked against the fleet's. The State is then the local limits', as
// State answers during the outage.
func (f *Fallback) Reserve(ctx context.Context, client string, lim *Limits, lease Lease, tokens int64, now time.Time) (Decision, error) {
	if err := checkReserve(lim, tokens); err != nil {
		return Decision{Lease: lease}, err
	}
	if lease.ID == "" {
		return f.local.Reserve(ctx, client, lim, lease, tokens, now)
	}
	if f.up(now) {
		sctx, cancel := context.WithTimeout(ctx, f.timeout)
		d, err := f.shared.Reserve(sctx, client, lim, lease, tokens, now)
		cancel()
		switch {
		case err == nil:
			f.recovered()
			f.noteQuota(client, lim, d.QuotaUsed, d.QuotaReset, now)
			return d, nil
		case errors.Is(err, ErrLeaseGone): // an answer, not a failure
			f.recovered()
			return d, err
		}
		f.failed(err, now)
	}
	if f.policy == Deny {
		return Decision{Lease: lease}, ErrUnavailable
	}
	s, err := f.local.State(ctx, client, lim, now)
	if err != nil {
		return Decision{Lease: lease}, err
	}
	d := Decision{Lease: lease, State: s}
	if tooLarge(lim, lease.Reserved, tokens) {
		d.Reason, d.RetryAfter = TooLarge, -1
	}
	return d, nil
}

// Settle implements Limiter. A lease from the shared backend (it names its
// slot) goes back there; one from the local limits stays local.
func (f *Fallback) Settle(ctx context.Context, client string, lim *Limits, lease Lease, used int64, now time.Time) error {
	if lease.ID == "" {
		return f.local.Settle(ctx, client, lim, lease, used, now)
	}
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	err := f.shared.Settle(ctx, client, lim, lease, used, now)
	if err != nil {
		f.failed(err, now)
	}
	return err
}

// SettleDeferred implements DeferredSettler. A lease from the shared
// backend goes back there, without waiting when the shared backend can
// (see DeferredSettler), and one from the local limits is settled at
// once, which costs no wait.
func (f *Fallback) SettleDeferred(client string, lim *Limits, lease Lease, used int64, now time.Time) {
	if lease.ID != "" {
		if d, ok := f.shared.(DeferredSettler); ok {
			d.SettleDeferred(client, lim, lease, used, now)
			return
		}
	}
	if err := f.Settle(context.Background(), client, lim, lease, used, now); err != nil {
		f.logger.Error("settling usage", zap.String("client_id", client), zap.Error(err))
	}
}

// State implements Limiter.
func (f *Fallback) State(ctx context.Context, client string, lim *Limits, now time.Time) (State, error) {
	if f.up(now) {
		ctx, cancel := context.WithTimeout(ctx, f.timeout)
		s, err := f.shared.State(ctx, client, lim, now)
		cancel()
		if err == nil {
			f.recovered()
			f.noteQuota(client, lim, s.QuotaUsed, s.QuotaReset, now)
			return s, nil
		}
		f.failed(err, now)
	}
	if f.policy == Deny {
		return State{}, ErrUnavailable
	}
	return f.local.State(ctx, client, lim, now)
}

// noteQuota keeps a shared answer's quota figure for the local limits,
// which decide from it should the shared backend fail.
func (f *Fallback) noteQuota(client string, lim *Limits, used int64, end, now time.Time) {
	if f.policy == UseLocal && !lim.Quota.Unlimited() {
		f.local.NoteSharedQuota(client, lim, used, end, now)
	}
}

// Down reports whether the fallback is in force.
func (f *Fallback) Down() bool { return f.downUntil.Load() != 0 }

// up reports whether to try the shared backend: it is up, or it has been
// left alone long enough to be probed again.
func (f *Fallback) up(now time.Time) bool {
	until := f.downUntil.Load()
	return until == 0 || now.UnixNano() >= until
}

func (f *Fallback) failed(err error, now time.Time) {
	if f.downUntil.Swap(now.Add(probeEvery).UnixNano()) == 0 {
		what := "deciding with local in-memory limits"
		if f.policy == Deny {
			what = "refusing requests"
		}
		f.logger.Error("the shared limiter failed; "+what+" until it answers again", zap.Error(err))
		if f.OnChange != nil {
			f.OnChange(true)
		}
	}
}

func (f *Fallback) recovered() {
	if f.downUntil.Load() != 0 && f.downUntil.Swap(0) != 0 {
		f.logger.Info("the shared limiter answers again; limits hold across instances again")
		if f.OnChange != nil {
			f.OnChange(false)
		}
	}
}

// Interface guards
var (
	_ Limiter         = (*Fallback)(nil)
	_ DeferredSettler = (*Fallback)(nil)
)
