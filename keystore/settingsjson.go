package keystore

import (
	"encoding/json"
	"fmt"

	"github.com/vigthoria/caddy-vigthoria/policy"
)

// encodeSettings is how the stores keep Settings: JSON, "" for none.
func encodeSettings(s policy.Settings) (string, error) {
	if s.IsZero() {
		return "", nil
	}
	b, err := json.Marshal(s)
	return string(b), err
}

// decodeSettings is the inverse of encodeSettings.
func decodeSettings(v string) (policy.Settings, error) {
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
