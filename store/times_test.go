package store

import (
	"errors"
	"testing"
	"time"
)

func TestParseSlot(t *testing.T) {
	now := time.Date(2026, 3, 4, 5, 59, 59, 0, time.UTC)
	if s := Slot(now); s != "2026-03-04T05:55" {
		t.Fatalf("Slot = %q", s)
	}
	if got, err := ParseSlot("2026-03-04T05:55"); err != nil || !got.Equal(now.Truncate(SlotStep)) {
		t.Fatalf("ParseSlot = %v, %v", got, err)
	}
	if _, err := ParseSlot("2026-03-04T05:56"); !errors.Is(err, ErrInvalid) {
		t.Errorf("a slot off the 5 minutes: %v, want ErrInvalid", err)
	}
}
