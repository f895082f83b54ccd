package dashboard

import (
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/policy"
)

// Source is what the dashboard reads of the vigthoria handlers of its
// Caddy: the "vigthoria" app implements it, so that this package needs
// nothing of the root package's.
type Source interface {
	// KeyService returns the key service of a store as configured ("" for
	// the default store), the very one the vigthoria handlers of that
	// store use, and the function that gives it back.
	KeyService(store string) (svc *keys.Service, spec string, release func() error, err error)

	// Policy returns the tiers and prices of the vigthoria handlers that
	// use the store spec (as KeyService returned it), or nil when none
	// does.
	Policy(spec string) Policy

	// Counters returns the proxy's counters since the process started.
	Counters() Counters
}

// Policy is the tiers and prices that a store's keys are limited by.
type Policy interface {
	// Tiers returns the configured tiers' names, sorted.
	Tiers() []string
	// Limits returns the limits of a key of tier with its own settings
	// (nil for none); false when the tier is not configured or the
	// settings cannot apply to it.
	Limits(tier string, s *policy.Settings) (Limits, bool)
	// Currency returns the currency of costs, or "" when no prices are
	// configured, so that costs say nothing.
	Currency() string
	// Caller says how the ledger's rows of a client that is not a key
	// are charted: under tier ("" when the configuration cannot tell,
	// such as a JWT's user whose tier is a claim of each token), or not
	// at all when another client's rows count them already (the user of
	// a minted token, whose minting key's rows hold its usage).
	Caller(client string) (tier string, counted bool)
}

// Limits are a key's effective limits: its tier's, each field replaced
// by the key's own setting where it has one. A nil or zero field is no
// limit.
type Limits struct {
	Requests   *policy.Rate   `json:"requests,omitempty"`
	Tokens     *policy.Rate   `json:"tokens,omitempty"`
	Concurrent int            `json:"concurrent,omitempty"`
	Quota      *policy.Amount `json:"quota,omitempty"`  // tokens
	Budget     *policy.Amount `json:"budget,omitempty"` // micro-units of the currency
	Models     []string       `json:"models,omitempty"`
	MaxTokens  int64          `json:"max_tokens,omitempty"`
}

// Counters are the proxy's running counts, as its metrics keep them.
type Counters struct {
	Requests int64            // every request the vigthoria handlers answered, refusals included
	Refused  map[string]int64 // refusals by reason (the error code)
	Streams  int64            // streams being served now
	// Queued is the requests waiting in the queue now; QueueWaited the
	// requests admitted after waiting, and QueueWait their waits' sum in
	// seconds, since the process started.
	Queued      int64
	QueueWaited int64
	QueueWait   float64
}
