package policy

import (
	"math"
	"testing"
)

func TestFormatCost(t *testing.T) {
	for micros, want := range map[int64]string{
		0: "0.000000", 1: "0.000001", 100_000: "0.100000", 1_234_567: "1.234567",
		50 * Micros: "50.000000", -1: "-0.000001",
		math.MaxInt64: "9223372036854.775807", math.MinInt64: "-9223372036854.775808",
	} {
		if got := FormatCost(micros); got != want {
			t.Errorf("FormatCost(%d) = %q, want %q", micros, got, want)
		}
	}
}
