package vigthoria

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/spf13/cobra"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// settingFlag is the flag of a setting: its JSON name with '-' for '_'.
func settingFlag(f *policy.SettingField) string { return strings.ReplaceAll(f.JSON, "_", "-") }

// addSettingFlags adds a flag for each field of Settings to cmd, and with
// clear a --clear-<field> flag for each.
func addSettingFlags(cmd *cobra.Command, clear bool) {
	for i := range policy.SettingFields {
		f := &policy.SettingFields[i]
		cmd.Flags().String(settingFlag(f), "", f.Usage+" (default: the tier's)")
		if clear {
			cmd.Flags().Bool("clear-"+settingFlag(f), false, "the key's "+f.JSON+" follow its tier again")
		}
	}
}

// settingsFromFlags applies the setting flags given to s. Errors wrap
// ErrInvalid.
func settingsFromFlags(cmd *cobra.Command, s *policy.Settings) error {
	for i := range policy.SettingFields {
		f := &policy.SettingFields[i]
		set := cmd.Flags().Changed(settingFlag(f))
		clear := cmd.Flags().Changed("clear-" + settingFlag(f))
		switch {
		case set && clear:
			return fmt.Errorf("%w: --%s and --clear-%s both given", store.ErrInvalid, settingFlag(f), settingFlag(f))
		case clear:
			f.Take(s, &policy.Settings{})
		case set:
			v, _ := cmd.Flags().GetString(settingFlag(f))
			if err := f.Parse(s, v); err != nil {
				return fmt.Errorf("%w: --%s '%s': %v", store.ErrInvalid, settingFlag(f), v, err)
			}
		}
	}
	return nil
}

// setNames lists the fields s sets, separated by commas, or none.
func setNames(s *policy.Settings, none string) string {
	var names []string
	for i := range policy.SettingFields {
		if _, ok := policy.SettingFields[i].Show(s); ok {
			names = append(names, policy.SettingFields[i].JSON)
		}
	}
	if names == nil {
		return none
	}
	return strings.Join(names, ",")
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
		if err := keys.SetSettings(cmd.Context(), st, rec.ID, s); err != nil {
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
		for i := range policy.SettingFields {
			f := &policy.SettingFields[i]
			v, own := f.Show(&rec.Settings)
			from := "key"
			if !own {
				v, from = "(the tier's)", "tier"
				if tier != nil {
					v = "none"
					if tv, ok := f.Show(tier); ok {
						v = tv
					}
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.JSON, printable(v), from)
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
