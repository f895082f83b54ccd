package ledger

import (
	"context"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// hourStores open each store that keeps hourly rows, for a test.
var hourStores = map[string]func(t *testing.T) store.Backend{
	"sqlite": func(t *testing.T) store.Backend {
		st, err := sqlite.Open(t.TempDir() + "/k.db")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	},
	"redis": func(t *testing.T) store.Backend {
		st, _ := openRedisTemp(t)
		return st
	},
}

// TestHours checks that both stores keep the ledger's hourly rows beside
// the daily ones and read them back for every client and for one.
func TestHours(t *testing.T) {
	for name, open := range hourStores {
		t.Run(name, func(t *testing.T) {
			l := New(nil)
			l.Attach(open(t))
			ctx := context.Background()
			now := time.Now().UTC()
			earlier := now.Add(-2 * time.Hour)
			l.Add("key_a", "m:1", earlier, Tokens{Prompt: 10, Completion: 5, Cost: 7})
			l.Add("key_a", "m:1", earlier, Tokens{Prompt: 1, Completion: 1})
			l.Add("key_b", "m2", now, Tokens{Prompt: 3})
			if err := l.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			l.Add("key_b", "m2", now, Tokens{Prompt: 4}) // pending, read too
			all, err := l.Hours(ctx, "", now.Add(-24*time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			want := []store.UsageRow{
				{Client: "key_a", Day: store.Hour(earlier), Model: "m:1", Requests: 2, PromptTokens: 11, CompletionTokens: 6, Cost: 7},
				{Client: "key_b", Day: store.Hour(now), Model: "m2", Requests: 2, PromptTokens: 7},
			}
			if len(all) != len(want) || all[0] != want[0] || all[1] != want[1] {
				t.Fatalf("got %+v, want %+v", all, want)
			}
			one, err := l.Hours(ctx, "key_a", now.Add(-time.Hour))
			if err != nil || len(one) != 0 {
				t.Fatalf("key_a in the last hour: got %+v, %v, want none", one, err)
			}
			one, err = l.Hours(ctx, "key_a", earlier)
			if err != nil || len(one) != 1 || one[0] != want[0] {
				t.Fatalf("key_a: got %+v, %v, want %+v", one, err, want[0])
			}
			days, err := l.UsageSince(ctx, "key_a", earlier)
			if err != nil || len(days) != 1 || days[0].Requests != 2 {
				t.Fatalf("the daily rows: got %+v, %v, want one row of 2 requests", days, err)
			}
		})
	}
}

// BenchmarkLedgerAdd is what the request path pays to count a request:
// its daily and hourly rows.
func BenchmarkLedgerAdd(b *testing.B) {
	l := New(nil)
	now := time.Now()
	for b.Loop() {
		l.Add("key_a", "m", now, Tokens{Prompt: 10, Completion: 5})
	}
}
