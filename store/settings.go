package store

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/vigthoria/caddy-vigthoria/policy"
)

// EncodeSettings is how the stores keep Settings: JSON, "" for none.
func EncodeSettings(s policy.Settings) (string, error) {
	if s.IsZero() {
		return "", nil
	}
	b, err := json.Marshal(s)
	return string(b), err
}

// DecodeSettings is the inverse of EncodeSettings.
func DecodeSettings(v string) (policy.Settings, error) {
	var s policy.Settings
	if v == "" {
		return s, nil
	}
	if err := json.Unmarshal([]byte(v), &s); err != nil {
		return policy.Settings{}, fmt.Errorf("reading settings: %w", err)
	}
	// Origins stored before they had to be written as browsers send
	// them would never match one: they are read in that form.
	for i, o := range s.Origins {
		if c, err := policy.CanonicalOrigin(o); err == nil {
			s.Origins[i] = c
		}
	}
	return s, nil
}

// JoinMint is how the stores keep Mint: the tiers joined by commas,
// which no tier holds; "" for none.
func JoinMint(mint []string) string { return strings.Join(mint, ",") }

// SplitMint is the inverse of JoinMint: nil for "".
func SplitMint(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}
