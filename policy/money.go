package policy

import (
	"fmt"
	"strings"
)

// ParseMoney reads a decimal amount of the currency, such as 50, 0.10 or
// 12.345678, as micro-units (see Micros), exactly: digits, and at most
// six after a point; no sign, exponent or spaces; at most max.
func ParseMoney(s string, max int64) (int64, error) {
	whole, frac, dotted := strings.Cut(s, ".")
	switch {
	case strings.HasPrefix(s, "-"):
		return 0, fmt.Errorf("'%s' is negative", s)
	case whole == "" || dotted && frac == "" || !allDigits(whole) || !allDigits(frac):
		return 0, fmt.Errorf("'%s' is not a decimal number such as 0.10", s)
	case len(frac) > 6:
		return 0, fmt.Errorf("'%s' has more than six decimal places", s)
	}
	tooLarge := fmt.Errorf("'%s' is more than %s", s, FormatMoney(max))
	whole = strings.TrimLeft(whole, "0")
	if len(whole) > 12 { // past 10^12 units: above any max, and int64 holds the digits
		return 0, tooLarge
	}
	var n int64
	for _, c := range whole + frac + strings.Repeat("0", 6-len(frac)) {
		n = n*10 + int64(c-'0')
	}
	if n > max {
		return 0, tooLarge
	}
	return n, nil
}

func allDigits(s string) bool {
	for i := range len(s) {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// Micros is the number of micro-units in one unit of a currency: costs
// are whole micro-units, so that sums of them are exact.
const Micros = 1_000_000

// FormatCost writes a cost in micro-units as a decimal number of units
// with six places, such as 1.234567: exact, where a float would drift.
func FormatCost(micros int64) string {
	sign, u := "", uint64(micros)
	if micros < 0 {
		sign, u = "-", -u
	}
	return fmt.Sprintf("%s%d.%06d", sign, u/Micros, u%Micros)
}
