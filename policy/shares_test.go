package policy

import (
	"strings"
	"testing"
)

// TestShares checks how max_buffered is divided between tiers and their
// callers by default, and which divisions are refused.
func TestShares(t *testing.T) {
	const mb, all = 10_000_000, 64 << 20
	type share struct{ max, perCaller int64 }
	for _, tc := range []struct {
		name      string
		tiers     map[string]*Tier
		anonymous string
		want      map[string]share
		err       string
	}{
		{"the anonymous tier gets one largest body, the others the rest",
			map[string]*Tier{"free": {}, "pro": {}}, "free",
			map[string]share{"free": {mb, mb}, "pro": {all - mb, (all - mb) / 4}}, ""},
		{"an anonymous tier alone gets everything",
			map[string]*Tier{"free": {}}, "free",
			map[string]share{"free": {all, all / 4}}, ""},
		{"without anonymous callers, equal shares",
			map[string]*Tier{"free": {}, "pro": {}}, "",
			map[string]share{"free": {all / 2, mb}, "pro": {all / 2, mb}}, ""},
		{"set shares are kept out of the split",
			map[string]*Tier{"free": {}, "basic": {}, "pro": {MaxBuffered: 40 << 20}}, "free",
			map[string]share{"free": {mb, mb}, "basic": {24<<20 - mb, mb}, "pro": {40 << 20, 10 << 20}}, ""},
		{"a concurrency limit bounds a caller",
			map[string]*Tier{"pro": {Concurrent: 1}, "team": {Concurrent: 3, MaxBufferedPerCaller: 20 << 20}}, "",
			map[string]share{"pro": {all / 2, mb}, "team": {all / 2, 20 << 20}}, ""},
		{"shares past max_buffered",
			map[string]*Tier{"free": {MaxBuffered: 40 << 20}, "pro": {MaxBuffered: 40 << 20}}, "",
			nil, "add up to"},
		{"a share below max_body",
			map[string]*Tier{"free": {MaxBuffered: 1 << 20}}, "",
			nil, "tier free: max_buffered (1048576) must be at least max_body"},
		{"nothing left for the others",
			map[string]*Tier{"free": {}, "pro": {MaxBuffered: 60 << 20}}, "",
			nil, "tier free: max_buffered"},
		{"a caller's ceiling past its tier's share",
			map[string]*Tier{"pro": {MaxBuffered: 20 << 20, MaxBufferedPerCaller: 30 << 20}}, "",
			nil, "per_caller"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &Config{MaxBody: mb, MaxBuffered: all, Tiers: tc.tiers, Anonymous: tc.anonymous}
			provisionShares(h)
			err := validateShares(h)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("validate said %v, want an error with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for name, want := range tc.want {
				got := h.Tiers[name]
				if got.MaxBuffered != want.max || got.MaxBufferedPerCaller != want.perCaller {
					t.Errorf("tier %s: share %d per caller %d, want %d and %d", name, got.MaxBuffered, got.MaxBufferedPerCaller, want.max, want.perCaller)
				}
				if got.bodies == nil {
					t.Errorf("tier %s: no counts", name)
				}
			}
		})
	}
}
