package policy

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"github.com/vigthoria/caddy-vigthoria/internal/strictjson"
)

// SettingField is one field of Settings, as the CLI's flags, the admin
// API's JSON and `key show` name it.
type SettingField struct {
	JSON  string // the JSON name; the flag's is the same with '-' for '_'
	Usage string
	Parse func(s *Settings, v string) error // sets the field from a flag's value
	Take  func(dst, src *Settings)          // copies the field (nil included)
	Show  func(s *Settings) (string, bool)  // the value, and whether it is set
}

// SettingFields are the fields of Settings, in the order they are shown.
var SettingFields = []SettingField{
	{JSON: "requests", Usage: "requests per window, as <n>/<window> [burst <b>], such as 100/1m",
		Parse: func(s *Settings, v string) error { r, err := ParseRate(v); s.Requests = &r; return err },
		Take:  func(dst, src *Settings) { dst.Requests = src.Requests },
		Show:  func(s *Settings) (string, bool) { return showSet(s.Requests, Rate.String) }},
	{JSON: "tokens", Usage: "prompt and completion tokens per window, such as 200000/1m",
		Parse: func(s *Settings, v string) error { r, err := ParseRate(v); s.Tokens = &r; return err },
		Take:  func(dst, src *Settings) { dst.Tokens = src.Tokens },
		Show:  func(s *Settings) (string, bool) { return showSet(s.Tokens, Rate.String) }},
	{JSON: "concurrent", Usage: "requests in flight at once",
		Parse: func(s *Settings, v string) error {
			n, err := ParsePositive(v)
			c := int(n)
			s.Concurrent = &c
			return err
		},
		Take: func(dst, src *Settings) { dst.Concurrent = src.Concurrent },
		Show: func(s *Settings) (string, bool) { return showSet(s.Concurrent, strconv.Itoa) }},
	{JSON: "quota", Usage: "tokens per day or month, such as 10000000/month",
		Parse: func(s *Settings, v string) error { a, err := ParseQuota(v); s.Quota = &a; return err },
		Take:  func(dst, src *Settings) { dst.Quota = src.Quota },
		Show: func(s *Settings) (string, bool) {
			return showSet(s.Quota, func(a Amount) string { return strconv.FormatInt(a.N, 10) + "/" + a.Period })
		}},
	{JSON: "budget", Usage: "money per day or month, in the currency of the Caddyfile's prices, such as 50/month or 0.5/day",
		Parse: func(s *Settings, v string) error { a, err := ParseBudget(v); s.Budget = &a; return err },
		Take:  func(dst, src *Settings) { dst.Budget = src.Budget },
		Show: func(s *Settings) (string, bool) {
			return showSet(s.Budget, func(a Amount) string { return FormatMoney(a.N) + "/" + a.Period })
		}},
	{JSON: "models", Usage: "model globs the key may use, separated by commas, such as 'vigthoria-fast-*'",
		Parse: func(s *Settings, v string) error { s.Models = splitList(v); return nil },
		Take:  func(dst, src *Settings) { dst.Models = src.Models },
		Show:  func(s *Settings) (string, bool) { return strings.Join(s.Models, ","), s.Models != nil }},
	{JSON: "max_tokens", Usage: "the most max_tokens a request may ask, per answer",
		Parse: func(s *Settings, v string) error {
			n, err := ParsePositive(v)
			s.MaxTokens = &n
			return err
		},
		Take: func(dst, src *Settings) { dst.MaxTokens = src.MaxTokens },
		Show: func(s *Settings) (string, bool) {
			return showSet(s.MaxTokens, func(n int64) string { return strconv.FormatInt(n, 10) })
		}},
	{JSON: "origins", Usage: "web origins whose pages may use the key, separated by commas, such as https://app.example.com (default: any)",
		Parse: func(s *Settings, v string) error { s.Origins = splitList(v); return nil },
		Take:  func(dst, src *Settings) { dst.Origins = src.Origins },
		Show:  func(s *Settings) (string, bool) { return strings.Join(s.Origins, ","), s.Origins != nil }},
}

// showSet formats *p, and reports whether p is set.
func showSet[T any](p *T, format func(T) string) (string, bool) {
	if p == nil {
		return "", false
	}
	return format(*p), true
}

// splitList splits a flag's comma-separated values; an empty one is an
// empty, non-nil list, which Settings.Check refuses.
func splitList(v string) []string {
	if v == "" {
		return []string{}
	}
	return strings.Split(v, ",")
}

// PatchSettings applies a JSON object of settings to s: a field set
// replaces the key's, a field set to null clears it (the tier's again),
// an absent field stays. Errors wrap ErrInvalid.
func PatchSettings(s *Settings, patch map[string]json.RawMessage) error {
	for name, raw := range patch {
		i := FieldIndex(name)
		if i < 0 {
			return fmt.Errorf("%w: unknown setting '%s'", ErrInvalid, name)
		}
		var v Settings
		if string(raw) != "null" {
			obj, _ := json.Marshal(map[string]json.RawMessage{name: raw})
			if err := strictjson.Unmarshal(obj, &v); err != nil {
				return fmt.Errorf("%w: setting %s: %v", ErrInvalid, name, err)
			}
		}
		SettingFields[i].Take(s, &v)
	}
	return nil
}

func FieldIndex(name string) int {
	for i := range SettingFields {
		if SettingFields[i].JSON == name {
			return i
		}
	}
	return -1
}
