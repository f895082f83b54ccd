// Package alerts tells operators when a caller's quota or budget crosses
// a threshold: once per key, threshold and period across a fleet (the
// alert is claimed in a shared store), as a Caddy event and as a webhook
// signed per the Standard Webhooks spec, delivered off the request path
// with retries.
//
// It imports none of the proxy's wings: the store's part is the Claimer
// interface, the events app's part an Emitter function.
package alerts

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"
)

// Kinds of alert. Budget and Quota are figures of use, which alert when
// they cross a threshold; the refusals alert when a request was refused
// for want of quota or budget, which may happen well below the limit (a
// request reserves its highest possible cost): they are not crossings.
const (
	Budget        = "budget"         // money, in integer micro-units of the currency
	Quota         = "quota"          // tokens
	BudgetRefused = "budget_refused" // a request refused for want of budget, in micro-units
	QuotaRefused  = "quota_refused"  // a request refused for want of quota, in tokens
	// UpstreamKey is a server key the upstream refused (401/403), taken
	// out of the pool, or returned to it by a probe: KeyName names it,
	// State says which, Status is the upstream's status.
	UpstreamKey = "upstream_key"
)

// Refused is the kind of refusal of a kind of use: QuotaRefused for
// Quota, BudgetRefused for Budget.
func Refused(kind string) string {
	if kind == Budget {
		return BudgetRefused
	}
	return QuotaRefused
}

// Layouts of a period's name: a calendar month or day, UTC.
const (
	monthLayout = "2006-01"
	dayLayout   = "2006-01-02"
	// minuteLayout names the minute of an UpstreamKey alert: one alert a
	// key, state and minute for the fleet.
	minuteLayout = "2006-01-02T15:04"
)

// Alert is a threshold crossed by a caller's figure in a period, or the
// first refusal of its requests for want of quota or budget in it.
type Alert struct {
	Type    string // Budget, Quota, BudgetRefused or QuotaRefused
	KeyID   string // the caller: a key ID or another identity; not secret
	KeyName string
	Tier    string
	Period  string // "2026-12" for a month, "2026-12-01" for a day
	Used    int64  // what the caller had used when the alert was noted
	Limit   int64  // the quota or budget of the period
	Percent int    // the threshold crossed, in percent of Limit; 0 for a refusal
	// Requested is, for a refusal, what the refused request would have
	// reserved; 0 when it asked none, the quota already spent.
	Requested int64
	// State ("disabled" or "enabled") and Status, of an UpstreamKey
	// alert.
	State  string
	Status int
	At     time.Time // when the crossing or the refusal was noted
}

// ClaimID names the alert in the claim store: type|key|threshold|period.
// Two instances noting the same crossing claim the same ID.
func (a Alert) ClaimID() string {
	if a.Type == UpstreamKey {
		return a.Type + "|" + a.KeyName + "|" + a.State + "|" + a.Period
	}
	return a.Type + "|" + a.KeyID + "|" + strconv.Itoa(a.Percent) + "|" + a.Period
}

// WebhookID is the alert's webhook-id: derived from its ClaimID, so that
// it is the same for each retry of its delivery, and a receiver that
// somehow got it twice can tell.
func (a Alert) WebhookID() string {
	sum := sha256.Sum256([]byte(a.ClaimID()))
	return "msg_" + base64.RawURLEncoding.EncodeToString(sum[:18])
}

// wireAlert is the webhook's body: percent for a crossing, requested
// for a refusal.
type wireAlert struct {
	Type      string `json:"type"`
	KeyID     string `json:"key_id"`
	KeyName   string `json:"key_name"`
	Tier      string `json:"tier"`
	Period    string `json:"period"`
	Used      int64  `json:"used"`
	Limit     int64  `json:"limit"`
	Percent   *int   `json:"percent,omitempty"`
	Requested *int64 `json:"requested,omitempty"`
	At        string `json:"at"`
}

// wireKeyAlert is an UpstreamKey alert's body.
type wireKeyAlert struct {
	Type   string `json:"type"`
	Key    string `json:"key"` // its name, or its fingerprint: never the key
	State  string `json:"state"`
	Status int    `json:"status"`
	At     string `json:"at"`
}

// refusal reports whether a is a refusal, not a crossing.
func (a *Alert) refusal() bool { return a.Type == BudgetRefused || a.Type == QuotaRefused }

// MarshalJSON writes the webhook's body: {type, key_id, key_name, tier,
// period, used, limit, percent, at} for a crossing, with requested
// instead of percent for a refusal; at in RFC 3339, UTC, to the second.
func (a Alert) MarshalJSON() ([]byte, error) {
	if a.Type == UpstreamKey {
		return json.Marshal(wireKeyAlert{Type: a.Type, Key: a.KeyName, State: a.State, Status: a.Status, At: a.At.UTC().Format(time.RFC3339)})
	}
	w := wireAlert{Type: a.Type, KeyID: a.KeyID, KeyName: a.KeyName, Tier: a.Tier, Period: a.Period,
		Used: a.Used, Limit: a.Limit, At: a.At.UTC().Format(time.RFC3339)}
	if a.refusal() {
		w.Requested = &a.Requested
	} else {
		w.Percent = &a.Percent
	}
	return json.Marshal(w)
}

// EventData is the alert as a Caddy event's data, with the body's names.
func (a Alert) EventData() map[string]any {
	d := map[string]any{
		"type": a.Type, "key_id": a.KeyID, "key_name": a.KeyName, "tier": a.Tier, "period": a.Period,
		"used": a.Used, "limit": a.Limit, "at": a.At.UTC().Format(time.RFC3339),
	}
	if a.refusal() {
		d["requested"] = a.Requested
	} else {
		d["percent"] = a.Percent
	}
	return d
}

// PeriodName names the calendar period ("day" or "month", UTC) that t
// falls in, as Figure.Period wants it. It allocates only when the
// period differs from the one it named last for unit.
func PeriodName(t time.Time, unit string) (string, error) {
	y, m, d := t.UTC().Date()
	var cache *atomic.Pointer[namedPeriod]
	switch unit {
	case "day":
		cache = &lastDay
	case "month":
		cache, d = &lastMonth, 0
	default:
		return "", fmt.Errorf("period unit '%s' is not day or month", unit)
	}
	if p := cache.Load(); p != nil && p.y == y && p.m == m && p.d == d {
		return p.name, nil
	}
	name := fmt.Sprintf("%04d-%02d", y, m)
	if d != 0 {
		name = fmt.Sprintf("%04d-%02d-%02d", y, m, d)
	}
	cache.Store(&namedPeriod{y, m, d, name})
	return name, nil
}

// namedPeriod is a period and its name: the last one PeriodName named
// for its unit.
type namedPeriod struct {
	y    int
	m    time.Month
	d    int // 0 for a month
	name string
}

var lastDay, lastMonth atomic.Pointer[namedPeriod]

// periodEnd returns when the named period ends.
func periodEnd(period string) (time.Time, error) {
	if t, err := time.Parse(minuteLayout, period); err == nil {
		return t.Add(time.Minute), nil
	}
	if t, err := time.Parse(dayLayout, period); err == nil {
		return t.AddDate(0, 0, 1), nil
	}
	if t, err := time.Parse(monthLayout, period); err == nil {
		return t.AddDate(0, 1, 0), nil
	}
	return time.Time{}, fmt.Errorf("period '%s' is neither YYYY-MM, YYYY-MM-DD nor YYYY-MM-DDTHH:MM", period)
}
