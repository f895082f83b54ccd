package policy

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/internal/strictjson"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// Settings are a key's own limits; each set field replaces its tier's
// field of the same name, a nil one follows the tier (and the tier's
// changes). The zero Settings follow the tier in everything. Once a
// Record or a Client holds them, they are never changed: a change is a
// new Settings.
type Settings struct {
	Requests   *Rate   `json:"requests,omitempty"`   // requests per window, as a token bucket
	Tokens     *Rate   `json:"tokens,omitempty"`     // prompt and completion tokens per window
	Concurrent *int    `json:"concurrent,omitempty"` // requests in flight at once
	Quota      *Amount `json:"quota,omitempty"`      // tokens per day or month
	Budget     *Amount `json:"budget,omitempty"`     // micro-units of the currency per day or month (1 USD = 1,000,000)
	// Models are globs (MatchModel) of the models the key may use; nil:
	// the tier's.
	Models    []string `json:"models,omitempty"`
	MaxTokens *int64   `json:"max_tokens,omitempty"` // the most max_tokens a request may ask, per answer
	// Origins are the web origins (scheme://host[:port]) whose pages may
	// use the key: a request with another Origin header is refused. nil:
	// any origin (the site's cors list still applies).
	Origins []string `json:"origins,omitempty"`
}

// Rate is a number allowed per window, as a token bucket of Burst (N
// when 0). In JSON the window is a duration string: {"n": 100,
// "window": "1m", "burst": 10}.
type Rate struct {
	N      int64
	Window time.Duration
	Burst  int64
}

// Amount is a number per calendar period (UTC): Period is "day" or
// "month".
type Amount struct {
	N      int64  `json:"n"`
	Period string `json:"period"`
}

// Bounds of what Settings may hold.
const (
	maxSettingsGlobs = 16
	// MaxModelName bounds a model name or glob: a caller chooses model
	// names, and they are logged, labelled and kept in the ledger.
	MaxModelName = 256
	// MaxMoney is the largest amount of money ParseMoney reads, in
	// micro-units: a million units of the currency.
	MaxMoney = 1_000_000_000_000
)

type rateJSON struct {
	N      int64  `json:"n"`
	Window string `json:"window"`
	Burst  int64  `json:"burst,omitempty"`
}

// MarshalJSON writes the window as a duration string.
func (r Rate) MarshalJSON() ([]byte, error) {
	return json.Marshal(rateJSON{N: r.N, Window: shortDuration(r.Window), Burst: r.Burst})
}

// UnmarshalJSON reads a window given as a duration string ("1m", "1d")
// or as nanoseconds.
func (r *Rate) UnmarshalJSON(b []byte) error {
	var raw struct {
		N      int64          `json:"n"`
		Window caddy.Duration `json:"window"`
		Burst  int64          `json:"burst"`
	}
	if err := strictjson.Unmarshal(b, &raw); err != nil {
		return err
	}
	*r = Rate{N: raw.N, Window: time.Duration(raw.Window), Burst: raw.Burst}
	return nil
}

// String is the rate as ParseRate reads it.
func (r Rate) String() string {
	s := strconv.FormatInt(r.N, 10) + "/" + shortDuration(r.Window)
	if r.Burst > 0 {
		s += " burst " + strconv.FormatInt(r.Burst, 10)
	}
	return s
}

// ParseRate reads "<n>/<window>" or "<n>/<window> burst <b>", such as
// "60/1m burst 10". Its errors say what is wrong, not what was given.
func ParseRate(s string) (Rate, error) {
	f := strings.Fields(s)
	if len(f) != 1 && !(len(f) == 3 && f[1] == "burst") {
		return Rate{}, errors.New("want <n>/<window> [burst <b>], such as 60/1m burst 10")
	}
	count, window, ok := strings.Cut(f[0], "/")
	if !ok {
		return Rate{}, errors.New("want <count>/<window>, such as 20/1m")
	}
	n, err := ParsePositive(count)
	if err != nil {
		return Rate{}, fmt.Errorf("count %v", err)
	}
	dur, err := caddy.ParseDuration(window)
	if err != nil || dur <= 0 {
		return Rate{}, fmt.Errorf("window '%s' is not a positive duration", window)
	}
	r := Rate{N: n, Window: dur}
	if len(f) == 3 {
		if r.Burst, err = ParsePositive(f[2]); err != nil {
			return Rate{}, fmt.Errorf("burst %v", err)
		}
	}
	return r, nil
}

// ParseQuota reads "<tokens>/day" or "<tokens>/month".
func ParseQuota(s string) (Amount, error) {
	return parseAmount(s, ParsePositive)
}

// ParseBudget reads "<money>/day" or "<money>/month", such as
// "50/month" or "0.25/day", into micro-units (see ParseMoney).
func ParseBudget(s string) (Amount, error) {
	return parseAmount(s, func(n string) (int64, error) { return ParseMoney(n, MaxMoney) })
}

func parseAmount(s string, number func(string) (int64, error)) (Amount, error) {
	count, period, _ := strings.Cut(s, "/")
	n, err := number(count)
	if err != nil {
		return Amount{}, err
	}
	a := Amount{N: n, Period: period}
	return a, a.check()
}

func (a Amount) check() error {
	if a.N <= 0 {
		return errors.New("the amount must be positive")
	}
	if a.Period != "day" && a.Period != "month" {
		return fmt.Errorf("period '%s' is not day or month", a.Period)
	}
	return nil
}

// ParsePositive reads a positive integer.
func ParsePositive(s string) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("'%s' is not a positive number", s)
	}
	return n, nil
}

// FormatMoney writes micro-units as ParseMoney reads them, with no more
// decimals than needed: 50000000 is "50", 100000 is "0.1".
func FormatMoney(micros int64) string {
	return strings.TrimSuffix(strings.TrimRight(FormatCost(micros), "0"), ".")
}

// shortDuration writes d as time.Duration does, without its zero
// minutes and seconds: 1m, 1h, 1h30m.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// ValidModelName reports whether a model name is at most MaxModelName
// bytes and free of control characters (C0, DEL and C1), which could
// forge lines in logs and in what the CLI prints.
func ValidModelName(model string) bool {
	if len(model) > MaxModelName {
		return false
	}
	for _, r := range model {
		if r < 0x20 || (r >= 0x7f && r <= 0x9f) {
			return false
		}
	}
	return true
}

// ValidGlob reports whether s is a model name or a model glob (see
// MatchModel).
func ValidGlob(s string) bool {
	return s != "" && ValidModelName(s) && CheckGlob(s) == nil
}

// IsZero reports whether s sets nothing: the key follows its tier.
func (s *Settings) IsZero() bool {
	return s.Requests == nil && s.Tokens == nil && s.Concurrent == nil && s.Quota == nil &&
		s.Budget == nil && s.Models == nil && s.MaxTokens == nil && s.Origins == nil
}

// Check validates s; the error wraps ErrInvalid.
func (s *Settings) Check() error {
	for _, r := range []struct {
		name string
		r    *Rate
	}{{"requests", s.Requests}, {"tokens", s.Tokens}} {
		if r.r != nil && (r.r.N <= 0 || r.r.Window <= 0 || r.r.Burst < 0) {
			return fmt.Errorf("%w: %s needs a positive n and window", ErrInvalid, r.name)
		}
	}
	if s.Concurrent != nil && *s.Concurrent <= 0 {
		return fmt.Errorf("%w: concurrent must be positive", ErrInvalid)
	}
	if s.MaxTokens != nil && (*s.MaxTokens <= 0 || *s.MaxTokens > wire.MaxTokenCap) {
		return fmt.Errorf("%w: max_tokens must be from 1 to %d", ErrInvalid, wire.MaxTokenCap)
	}
	if s.Quota != nil {
		if err := s.Quota.check(); err != nil {
			return fmt.Errorf("%w: quota: %v", ErrInvalid, err)
		}
	}
	if s.Budget != nil {
		if err := s.Budget.check(); err != nil || s.Budget.N > MaxMoney {
			return fmt.Errorf("%w: budget: a positive amount up to %s per day or month", ErrInvalid, FormatMoney(MaxMoney))
		}
	}
	if s.Models != nil && (len(s.Models) == 0 || len(s.Models) > maxSettingsGlobs) {
		return fmt.Errorf("%w: models: 1 to %d globs (clear them to follow the tier)", ErrInvalid, maxSettingsGlobs)
	}
	for _, m := range s.Models {
		if !ValidGlob(m) {
			return fmt.Errorf("%w: models: '%s' is not a model name or glob such as vigthoria-fast-*", ErrInvalid, m)
		}
	}
	if s.Origins != nil && (len(s.Origins) == 0 || len(s.Origins) > maxSettingsGlobs) {
		return fmt.Errorf("%w: origins: 1 to %d origins (clear them to allow any)", ErrInvalid, maxSettingsGlobs)
	}
	for _, o := range s.Origins {
		if err := CheckOrigin(o); err != nil {
			return fmt.Errorf("%w: origins: %v", ErrInvalid, err)
		}
	}
	return nil
}

// AllowsOrigin reports whether a request with the Origin header origin
// may use a key of these settings: any origin when s is nil or lists
// none, and requests without Origin (servers, SDKs) always.
func (s *Settings) AllowsOrigin(origin string) bool {
	return s == nil || s.Origins == nil || origin == "" || slices.Contains(s.Origins, origin)
}
