package admission

import (
	"time"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/limiter"
)

// noteUsage tells the alerts where client stands after a request
// settled: kind is alerts.Quota or alerts.Budget, used and limit its
// figures in the period named period (alerts.PeriodName). It costs
// nothing unless a threshold is newly crossed, and never waits.
func (ad *Admitter) noteUsage(kind string, client caller.Client, used, limit int64, period string) {
	ad.Notifier.Note(alerts.Figure{Type: kind, KeyID: client.ID, KeyName: client.Name, Tier: client.Tier,
		Period: period, Used: used, Limit: limit})
}

// NoteStanding notes the quotas and budgets of an admission's sides
// after it settled, having used used: the caller's token quota, and the
// quota and budgets of its other sides (its own budget, the minting key's
// limits and budget). Settle does not return the figures, so each is the
// one the side's last decision saw, less its reservation, plus what was
// used: requests of the same account settled meanwhile are not in it,
// and are counted by the next figure noted. Only use crosses a
// threshold: a refusal is noted apart, by noteRefused.
func (ad *Admitter) NoteStanding(a *Admission, used ledger.Tokens) {
	ad.noteSide(alerts.Quota, a.client, a.lim, &a.Decision, used.Total())
	for i := range a.n {
		s := &a.sides[i]
		kind, n := alerts.Quota, used.Total()
		if s.money {
			kind, n = alerts.Budget, used.Cost
		}
		ad.noteSide(kind, s.who, s.lim, &s.d, n)
	}
}

// noteSide notes the figure of one side: the account of c, under lim,
// as d decided it, having used used.
func (ad *Admitter) noteSide(kind string, c caller.Client, lim *limiter.Limits, d *limiter.Decision, used int64) {
	if period, ok := quotaPeriod(lim, d); ok {
		ad.noteUsage(kind, c, d.QuotaUsed-d.Lease.Reserved+used, lim.Quota.N, period)
	}
}

// noteRefused tells the alerts that d refused a request of the account
// of c, under lim, for its quota (kind alerts.Quota) or budget
// (alerts.Budget), when it asked requested (tokens or micro-units). It
// never waits.
func (ad *Admitter) noteRefused(kind string, c caller.Client, lim *limiter.Limits, d *limiter.Decision, requested int64) {
	if d.Reason != limiter.QuotaLimit {
		return
	}
	if period, ok := quotaPeriod(lim, d); ok {
		ad.Notifier.Note(alerts.Figure{Type: alerts.Refused(kind), KeyID: c.ID, KeyName: c.Name, Tier: c.Tier,
			Period: period, Used: d.QuotaUsed - d.Lease.Reserved, Limit: lim.Quota.N, Requested: requested})
	}
}

// quotaPeriod names the quota period d counts in, as the alerts name it;
// false when lim has no quota or d no figure of it.
func quotaPeriod(lim *limiter.Limits, d *limiter.Decision) (string, bool) {
	q := &lim.Quota
	if q.Unlimited() || d.QuotaReset.IsZero() {
		return "", false
	}
	period, err := alerts.PeriodName(d.QuotaReset.Add(-time.Nanosecond), q.Period.String())
	return period, err == nil // provision checked the period
}
