package vigthoria

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/spf13/cobra"

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
	if s == nil {
		return none
	}
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

// patchFromFlags returns the setting flags given as a JSON patch (see
// adminAPI): a set setting its value, a cleared one null. Errors wrap
// ErrInvalid.
func patchFromFlags(cmd *cobra.Command) (map[string]json.RawMessage, error) {
	var s policy.Settings
	if err := settingsFromFlags(cmd, &s); err != nil {
		return nil, err
	}
	b, _ := json.Marshal(&s)
	var set map[string]json.RawMessage
	_ = json.Unmarshal(b, &set)
	patch := map[string]json.RawMessage{}
	for i := range policy.SettingFields {
		f := &policy.SettingFields[i]
		switch {
		case cmd.Flags().Changed("clear-" + settingFlag(f)):
			patch[f.JSON] = json.RawMessage("null")
		case cmd.Flags().Changed(settingFlag(f)):
			if set[f.JSON] == nil {
				return nil, fmt.Errorf("%w: --%s '' sets nothing; --clear-%s makes it follow the tier", store.ErrInvalid, settingFlag(f), settingFlag(f))
			}
			patch[f.JSON] = set[f.JSON]
		}
	}
	return patch, nil
}

func cliUpdate(cmd *cobra.Command, args []string) error {
	patch, err := patchFromFlags(cmd)
	if err != nil {
		return err
	}
	t, err := cliTarget(cmd, false)
	if err != nil {
		return err
	}
	defer t.close()
	k, err := t.patchKey(cmd.Context(), args[0], patch)
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "Updated key %s: its own settings are %s. %s\n",
		k.ID, setNames(k.Settings, "none (it follows its tier)"), applied(t))
	return nil
}

// cliShow prints a key and each of its settings: its own value, or the
// tier's. With --config, the tier's values are read from the Caddyfile.
func cliShow(cmd *cobra.Command, args []string) error {
	t, err := cliTarget(cmd, false)
	if err != nil {
		return err
	}
	defer t.close()
	k, err := t.getKey(cmd.Context(), args[0])
	if err != nil {
		return err
	}
	var tier *policy.Settings
	if config, _ := cmd.Flags().GetString("config"); config != "" {
		if tier, err = configTier(config, k.Tier); err != nil {
			return err
		}
	}
	own := k.Settings
	if own == nil {
		own = &policy.Settings{}
	}
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "Key %s: name %s, tier %s, %s, created %s, expires %s, last used %s, mints %s.\n\n", k.ID,
		printable(k.Name), printable(k.Tier), k.State, formatTime(k.Created, "-"),
		formatTime(deref(k.Expires), "never"), formatTime(deref(k.LastUsed), "never"), formatMint(k.Mint, "no tokens"))
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SETTING\tVALUE\tFROM")
	for i := range policy.SettingFields {
		f := &policy.SettingFields[i]
		v, isOwn := f.Show(own)
		from := "key"
		if !isOwn {
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
}

// configTier reads the limits of tier from the vigthoria handler of a
// Caddyfile (or a JSON config, by its extension), as Settings.
func configTier(path, tier string) (*policy.Settings, error) {
	tiers, err := configTiers(path)
	if err != nil {
		return nil, err
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

// configHasTiers returns an error unless the config at path has each
// of the tiers names.
func configHasTiers(path string, names []string) error {
	tiers, err := configTiers(path)
	if err != nil {
		return err
	}
	for _, n := range names {
		if _, ok := tiers[n]; !ok {
			have := slices.Sorted(maps.Keys(tiers))
			return fmt.Errorf("%w: %s has no tier '%s' (its tiers: %s), so its keys would be refused; give --force to store it anyway",
				store.ErrInvalid, path, n, strings.Join(have, ", "))
		}
	}
	return nil
}

// configTiers reads the tiers of the vigthoria handler of a Caddyfile
// (or a JSON config, by its extension).
func configTiers(path string) (map[string]any, error) {
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
	return tiers, nil
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
