package store

import (
	"fmt"
	"time"
)

// Day formats t as the ledger's UTC day.
func Day(t time.Time) string { return t.UTC().Format(time.DateOnly) }

// HourRetention is how long the ledger's hourly rows are kept: the
// dashboard's 30 days, and a whole calendar month (at most 31 days)
// with a day to spare. The daily rows are kept far longer (SQLite:
// forever; Redis: 400 days after their last write).
const HourRetention = 32 * 24 * time.Hour

// HourLayout is the ledger's UTC hour: YYYY-MM-DDTHH.
const HourLayout = "2006-01-02T15"

// Hour formats t as the ledger's UTC hour, YYYY-MM-DDTHH.
func Hour(t time.Time) string { return t.UTC().Format(HourLayout) }

// ParseHour reads an hour that Hour wrote.
func ParseHour(s string) (time.Time, error) { return time.Parse(HourLayout, s) }

// SlotStep is the length of the ledger's shortest rows: the dashboard's
// last 24 hours are charted by 5 minutes.
const SlotStep = 5 * time.Minute

// SlotRetention is how long the ledger's 5-minute rows (usage and
// refusals) are kept: the dashboard's last 24 hours, with two to spare
// for instances whose clocks differ. The hourly rows are kept
// HourRetention, the daily ones far longer.
const SlotRetention = 26 * time.Hour

// slotLayout is the ledger's UTC 5-minute slot, named by its first
// minute: YYYY-MM-DDTHH:MM. Its first len(HourLayout) bytes are its
// hour.
const slotLayout = "2006-01-02T15:04"

// Slot formats the 5-minute slot of t as the ledger's: YYYY-MM-DDTHH:MM,
// UTC, the minute a multiple of 5.
func Slot(t time.Time) string { return t.UTC().Truncate(SlotStep).Format(slotLayout) }

// IsSlot reports whether a pending row's time is a slot, not an hour
// that foldSlots folded it into.
func IsSlot(s string) bool { return len(s) == len(slotLayout) }

// ParseSlot reads a slot that Slot wrote.
func ParseSlot(s string) (time.Time, error) {
	t, err := time.Parse(slotLayout, s)
	if err == nil && !t.Truncate(SlotStep).Equal(t) {
		return time.Time{}, fmt.Errorf("%w: slot '%s' does not start on a multiple of 5 minutes", ErrInvalid, s)
	}
	return t, err
}

// StoredTime is t as stores keep it: UTC, to the millisecond, without a
// monotonic reading.
func StoredTime(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC().Truncate(time.Millisecond)
}

// Millis is t in unix milliseconds, 0 for the zero time.
func Millis(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

// FromMillis is the inverse of Millis, in UTC.
func FromMillis(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms).UTC()
}
