package store

import (
	"fmt"
	"math"
)

// UsageRow is one client's usage of one model on one UTC day.
type UsageRow struct {
	Client           string
	Day              string // YYYY-MM-DD, UTC
	Model            string
	Requests         int64
	PromptTokens     int64
	CompletionTokens int64
	CachedTokens     int64 // of PromptTokens, where the upstream said
	ReasoningTokens  int64 // of CompletionTokens, where the upstream said
	Cost             int64 // micro-units of the currency, at the prices when each use was added
}

// TotalTokens returns prompt plus completion tokens.
func (r UsageRow) TotalTokens() int64 { return AddCount(r.PromptTokens, r.CompletionTokens) }

// Add adds the counts of o to r's. Every count stops at the largest
// int64: a figure that large is wrong already, and must not wrap into a
// negative one that starts a quota over.
func (r *UsageRow) Add(o UsageRow) {
	r.Requests = AddCount(r.Requests, o.Requests)
	r.PromptTokens = AddCount(r.PromptTokens, o.PromptTokens)
	r.CompletionTokens = AddCount(r.CompletionTokens, o.CompletionTokens)
	r.CachedTokens = AddCount(r.CachedTokens, o.CachedTokens)
	r.ReasoningTokens = AddCount(r.ReasoningTokens, o.ReasoningTokens)
	r.Cost = AddCount(r.Cost, o.Cost)
}

// AddCount returns a+b, saturating at the bounds of int64.
func AddCount(a, b int64) int64 {
	sum := a + b
	if (sum > a) != (b > 0) { // wrapped
		if b > 0 {
			return math.MaxInt64
		}
		return math.MinInt64
	}
	return sum
}

// UsageBatch is one write of the ledger: its rows, and which write of
// which ledger it is. A write whose answer was lost (a connection that
// broke after the store applied it) is retried as the same batch, and a
// store that can lose answers applies it only once.
type UsageBatch struct {
	Writer string // the ledger's own random ID
	Seq    uint64 // grows with each new batch of the writer
	Rows   []UsageRow
	// Hours are the same uses by hour: each row's Day holds its UTC
	// hour, YYYY-MM-DDTHH (see Hour). A store keeps them HourRetention.
	Hours []UsageRow
	// Refusals are the refused requests of the same time, by hour
	// only: kept HourRetention as the Hours.
	Refusals []RefusalRow
	// Slots are the same uses by 5-minute slot: each row's Day holds
	// its UTC slot, YYYY-MM-DDTHH:MM (see Slot). A store keeps them
	// SlotRetention.
	Slots []UsageRow
	// SlotRefusals are the Refusals by 5-minute slot: each row's Hour
	// holds its slot. Kept SlotRetention as the Slots.
	SlotRefusals []RefusalRow
}

// RefusedError is the error of AddUsage when the store refused rows for
// good: the rows themselves cannot be stored (a constraint or a type error
// in SQLite, a usage hash of another type in Redis, a script that fails on
// them), so writing them again would fail again. The rest of the batch
// was written.
type RefusedError struct {
	Rows     []UsageRow
	Refusals []RefusalRow
	Err      error // why
}

func (e *RefusedError) Error() string {
	if len(e.Refusals) > 0 {
		return fmt.Sprintf("the store refused %d usage rows and %d refusal rows: %v", len(e.Rows), len(e.Refusals), e.Err)
	}
	return fmt.Sprintf("the store refused %d usage rows: %v", len(e.Rows), e.Err)
}

func (e *RefusedError) Unwrap() error { return e.Err }

// RefusalRow is how many requests of one identified client the proxy
// refused for one reason in one UTC hour.
type RefusalRow struct {
	Client string
	Hour   string // YYYY-MM-DDTHH, UTC (see Hour)
	Reason string // the error code of the refusals, such as rate_limit_exceeded
	Count  int64
}

// MaxReasonLen bounds a refusal's reason: the proxy's error codes are
// short.
const MaxReasonLen = 64

// ValidReason reports whether reason can be a refusal's: 1 to 64 bytes
// of a-z, 0-9 and _, as the proxy's error codes are.
func ValidReason(reason string) bool {
	if reason == "" || len(reason) > MaxReasonLen {
		return false
	}
	for i := 0; i < len(reason); i++ {
		if c := reason[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' {
			return false
		}
	}
	return true
}
