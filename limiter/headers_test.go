package limiter

import (
	"net/http"
	"testing"
	"time"
)

func TestSetHeaders(t *testing.T) {
	now := time.Date(2026, 11, 25, 18, 0, 0, 0, time.UTC)
	state := State{RequestsRemaining: 7, RequestsReset: 18 * time.Second, TokensRemaining: 900, TokensReset: 6 * time.Second, QuotaUsed: 400}
	for _, tc := range []struct {
		name string
		lim  Limits
		want map[string]string
	}{
		{"every limit", Limits{Requests: Rate{N: 10, Window: time.Minute}, Tokens: Rate{N: 1000, Window: time.Minute, Burst: 1500}, Quota: Quota{N: 1000, Period: Day}},
			map[string]string{
				"X-Ratelimit-Limit-Requests": "10", "X-Ratelimit-Remaining-Requests": "7", "X-Ratelimit-Reset-Requests": "18s",
				"X-Ratelimit-Limit-Tokens": "1500", "X-Ratelimit-Remaining-Tokens": "900", "X-Ratelimit-Reset-Tokens": "6s",
				"Ratelimit-Policy": `"requests";q=10;w=60, "tokens";q=1500;w=90, "quota";q=1000;w=86400`,
				"Ratelimit":        `"requests";r=7;t=18, "tokens";r=900;t=6, "quota";r=600;t=21600`,
			}},
		{"quota alone", Limits{Quota: Quota{N: 1000, Period: Day}},
			map[string]string{"Ratelimit-Policy": `"quota";q=1000;w=86400`, "Ratelimit": `"quota";r=600;t=21600`}},
		{"tokens alone", Limits{Tokens: Rate{N: 1000, Window: time.Minute}},
			map[string]string{
				"X-Ratelimit-Limit-Tokens": "1000", "X-Ratelimit-Remaining-Tokens": "900", "X-Ratelimit-Reset-Tokens": "6s",
				"Ratelimit-Policy": `"tokens";q=1000;w=60`, "Ratelimit": `"tokens";r=900;t=6`,
			}},
		{"no limits", Limits{Concurrent: 3}, map[string]string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			SetHeaders(h, &tc.lim, state, now)
			if len(h) != len(tc.want) {
				t.Errorf("got %d headers %v, want %d", len(h), h, len(tc.want))
			}
			for name, want := range tc.want {
				if got := h[name]; len(got) != 1 || got[0] != want {
					t.Errorf("%s = %q, want %q", name, got, want)
				}
			}
		})
	}
}

// SetHeaders runs on every admitted request: one string and one slice for
// all values, and the two resets' durations.
func TestSetHeadersAllocations(t *testing.T) {
	lim := &Limits{Requests: Rate{N: 10, Window: time.Minute}, Tokens: Rate{N: 1000, Window: time.Minute}, Quota: Quota{N: 1000, Period: Month}}
	state := State{RequestsRemaining: 7, RequestsReset: 18 * time.Second, TokensRemaining: 900, TokensReset: 6 * time.Second}
	h := make(http.Header, 16)
	now := time.Now()
	if n := testing.AllocsPerRun(100, func() { SetHeaders(h, lim, state, now) }); n > 4 {
		t.Errorf("%v allocations, want at most 4", n)
	}
}
