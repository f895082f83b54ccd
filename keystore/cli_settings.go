package keystore

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/spf13/cobra"

	"github.com/vigthoria/caddy-vigthoria/internal/strictjson"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// settingField is one field of Settings, as the CLI's flags, the admin
// API's JSON and `key show` name it.
type settingField struct {
	json  string // the JSON name; the flag's is the same with '-' for '_'
	usage string
	parse func(s *policy.Settings, v string) error // sets the field from a flag's value
	take  func(dst, src *policy.Settings)          // copies the field (nil included)
	show  func(s *policy.Settings) (string, bool)  // the value, and whether it is set
}

// settingFields are the fields of Settings, in the order they are shown.
var settingFields = []settingField{
	{json: "requests", usage: "requests per window, as <n>/<window> [burst <b>], such as 100/1m",
		parse: func(s *policy.Settings, v string) error { r, err := policy.ParseRate(v); s.Requests = &r; return err },
		take:  func(dst, src *policy.Settings) { dst.Requests = src.Requests },
		show:  func(s *policy.Settings) (string, bool) { return showSet(s.Requests, policy.Rate.String) }},
	{json: "tokens", usage: "prompt and completion tokens per window, such as 200000/1m",
		parse: func(s *policy.Settings, v string) error { r, err := policy.ParseRate(v); s.Tokens = &r; return err },
		take:  func(dst, src *policy.Settings) { dst.Tokens = src.Tokens },
		show:  func(s *policy.Settings) (string, bool) { return showSet(s.Tokens, policy.Rate.String) }},
	{json: "concurrent", usage: "requests in flight at once",
		parse: func(s *policy.Settings, v string) error {
			n, err := policy.ParsePositive(v)
			c := int(n)
			s.Concurrent = &c
			return err
		},
		take: func(dst, src *policy.Settings) { dst.Concurrent = src.Concurrent },
		show: func(s *policy.Settings) (string, bool) { return showSet(s.Concurrent, strconv.Itoa) }},
	{json: "quota", usage: "tokens per day or month, such as 10000000/month",
		parse: func(s *policy.Settings, v string) error { a, err := policy.ParseQuota(v); s.Quota = &a; return err },
		take:  func(dst, src *policy.Settings) { dst.Quota = src.Quota },
		show: func(s *policy.Settings) (string, bool) {
			return showSet(s.Quota, func(a policy.Amount) string { return strconv.FormatInt(a.N, 10) + "/" + a.Period })
		}},
	{json: "budget", usage: "money per day or month, in the currency of the Caddyfile's prices, such as 50/month or 0.5/day",
		parse: func(s *policy.Settings, v string) error { a, err := policy.ParseBudget(v); s.Budget = &a; return err },
		take:  func(dst, src *policy.Settings) { dst.Budget = src.Budget },
		show: func(s *policy.Settings) (string, bool) {
			return showSet(s.Budget, func(a policy.Amount) string { return policy.FormatMoney(a.N) + "/" + a.Period })
		}},
	{json: "models", usage: "model globs the key may use, separated by commas, such as 'vigthoria-fast-*'",
		parse: func(s *policy.Settings, v string) error { s.Models = splitList(v); return nil },
		take:  func(dst, src *policy.Settings) { dst.Models = src.Models },
		show:  func(s *policy.Settings) (string, bool) { return strings.Join(s.Models, ","), s.Models != nil }},
	{json: "max_tokens", usage: "the most max_tokens a request may ask, per answer",
		parse: func(s *policy.Settings, v string) error {
			n, err := policy.ParsePositive(v)
			s.MaxTokens = &n
			return err
		},
		take: func(dst, src *policy.Settings) { dst.MaxTokens = src.MaxTokens },
		show: func(s *policy.Settings) (string, bool) {
			return showSet(s.MaxTokens, func(n int64) string { return strconv.FormatInt(n, 10) })
		}},
	{json: "origins", usage: "web origins whose pages may use the key, separated by commas, such as https://app.example.com (default: any)",
		parse: func(s *policy.Settings, v string) error { s.Origins = splitList(v); return nil },
		take:  func(dst, src *policy.Settings) { dst.Origins = src.Origins },
		show:  func(s *policy.Settings) (string, bool) { return strings.Join(s.Origins, ","), s.Origins != nil }},
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

func (f *settingField) flag() string { return strings.ReplaceAll(f.json, "_", "-") }

// addSettingFlags adds a flag for each field of Settings to cmd, and with
// clear a --clear-<field> flag for each.
func addSettingFlags(cmd *cobra.Command, clear bool) {
	for i := range settingFields {
		f := &settingFields[i]
		cmd.Flags().String(f.flag(), "", f.usage+" (default: the tier's)")
		if clear {
			cmd.Flags().Bool("clear-"+f.flag(), false, "the key's "+f.json+" follow its tier again")
		}
	}
}

// settingsFromFlags applies the setting flags given to s. Errors wrap
// ErrInvalid.
func settingsFromFlags(cmd *cobra.Command, s *policy.Settings) error {
	for i := range settingFields {
		f := &settingFields[i]
		set := cmd.Flags().Changed(f.flag())
		clear := cmd.Flags().Changed("clear-" + f.flag())
		switch {
		case set && clear:
			return fmt.Errorf("%w: --%s and --clear-%s both given", store.ErrInvalid, f.flag(), f.flag())
		case clear:
			f.take(s, &policy.Settings{})
		case set:
			v, _ := cmd.Flags().GetString(f.flag())
			if err := f.parse(s, v); err != nil {
				return fmt.Errorf("%w: --%s '%s': %v", store.ErrInvalid, f.flag(), v, err)
			}
		}
	}
	return nil
}

// setNames lists the fields s sets, separated by commas, or none.
func setNames(s *policy.Settings, none string) string {
	var names []string
	for i := range settingFields {
		if _, ok := settingFields[i].show(s); ok {
			names = append(names, settingFields[i].json)
		}
	}
	if names == nil {
		return none
	}
	return strings.Join(names, ",")
}

// patchSettings applies a JSON object of settings to s: a field set
// replaces the key's, a field set to null clears it (the tier's again),
// an absent field stays. Errors wrap ErrInvalid.
func patchSettings(s *policy.Settings, patch map[string]json.RawMessage) error {
	for name, raw := range patch {
		i := fieldIndex(name)
		if i < 0 {
			return fmt.Errorf("%w: unknown setting '%s'", store.ErrInvalid, name)
		}
		var v policy.Settings
		if string(raw) != "null" {
			obj, _ := json.Marshal(map[string]json.RawMessage{name: raw})
			if err := strictjson.Unmarshal(obj, &v); err != nil {
				return fmt.Errorf("%w: setting %s: %v", store.ErrInvalid, name, err)
			}
		}
		settingFields[i].take(s, &v)
	}
	return nil
}

func fieldIndex(name string) int {
	for i := range settingFields {
		if settingFields[i].json == name {
			return i
		}
	}
	return -1
}

// withKey runs f with the store of the --store flag and the record of
// the key id.
func withKey(cmd *cobra.Command, id string, f func(st store.Backend, rec store.Record) error) error {
	st, _, err := cliStore(cmd, false)
	if err != nil {
		return err
	}
	defer st.Close()
	rec, err := st.Get(cmd.Context(), id)
	if err != nil {
		return err
	}
	return f(st, rec)
}

func cliUpdate(cmd *cobra.Command, args []string) error {
	return withKey(cmd, args[0], func(st store.Backend, rec store.Record) error {
		s := rec.Settings
		if err := settingsFromFlags(cmd, &s); err != nil {
			return err
		}
		if err := SetSettings(cmd.Context(), st, rec.ID, s); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "Updated key %s: its own settings are %s. A running Caddy applies them within a second.\n",
			rec.ID, setNames(&s, "none (it follows its tier)"))
		return nil
	})
}

// cliShow prints a key and each of its settings: its own value, or the
// tier's. With --config, the tier's values are read from the Caddyfile.
func cliShow(cmd *cobra.Command, args []string) error {
	return withKey(cmd, args[0], func(_ store.Backend, rec store.Record) error {
		var tier *policy.Settings
		if config, _ := cmd.Flags().GetString("config"); config != "" {
			var err error
			if tier, err = configTier(config, rec.Tier); err != nil {
				return err
			}
		}
		out := cmd.OutOrStdout()
		fmt.Fprintf(out, "Key %s: name %s, tier %s, %s, created %s, expires %s, last used %s, mints %s.\n\n", rec.ID,
			printable(rec.Name), rec.Tier, rec.State(time.Now()), formatTime(rec.Created, "-"),
			formatTime(rec.Expires, "never"), formatTime(rec.LastUsed, "never"), formatMint(rec.Mint, "no tokens"))
		tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "SETTING\tVALUE\tFROM")
		for i := range settingFields {
			f := &settingFields[i]
			v, own := f.show(&rec.Settings)
			from := "key"
			if !own {
				v, from = "(the tier's)", "tier"
				if tier != nil {
					v = "none"
					if tv, ok := f.show(tier); ok {
						v = tv
					}
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.json, printable(v), from)
		}
		return tw.Flush()
	})
}

// configTier reads the limits of tier from the vigthoria handler of a
// Caddyfile (or a JSON config, by its extension), as Settings.
func configTier(path, tier string) (*policy.Settings, error) {
	body, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cfg := body
	if !strings.HasSuffix(path, ".json") {
		adapter := caddyconfig.GetAdapter("caddyfile")
		if adapter == nil {
			return nil, errors.New("this build has no Caddyfile adapter")
		}
		if cfg, _, err = adapter.Adapt(body, map[string]any{"filename": path}); err != nil {
			return nil, fmt.Errorf("adapting %s: %w", path, err)
		}
	}
	var doc any
	if err := json.Unmarshal(cfg, &doc); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	tiers, ok := findTiers(doc)
	if !ok {
		return nil, fmt.Errorf("%s has no vigthoria handler", path)
	}
	raw, ok := tiers[tier]
	if !ok {
		return nil, fmt.Errorf("%s configures no tier %s: the key's requests are refused", path, tier)
	}
	// A tier's JSON has the fields of Settings of the same names.
	b, _ := json.Marshal(raw)
	var s policy.Settings
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("reading tier %s of %s: %w", tier, path, err)
	}
	return &s, nil
}

// findTiers finds the tiers of a vigthoria handler in a config; a config
// of several such handlers should hold the same tiers in each.
func findTiers(v any) (map[string]any, bool) {
	switch v := v.(type) {
	case map[string]any:
		if v["handler"] == "vigthoria" {
			tiers, _ := v["tiers"].(map[string]any)
			return tiers, true
		}
		for _, c := range v {
			if t, ok := findTiers(c); ok {
				return t, true
			}
		}
	case []any:
		for _, c := range v {
			if t, ok := findTiers(c); ok {
				return t, true
			}
		}
	}
	return nil, false
}
