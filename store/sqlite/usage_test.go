package sqlite

import (
	"database/sql"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// TestSQLiteLedgerUpgradesInPlace: a store of the schema before the
// cached and reasoning tokens, or of the one before the cost, opens with
// its usage kept, counting none of them, and keeps them from then on.
func TestSQLiteLedgerUpgradesInPlace(t *testing.T) {
	// 2: before migration 3, the details; 5: before migration 6, the cost.
	for _, version := range []int{2, 5} {
		t.Run(fmt.Sprintf("version %d", version), func(t *testing.T) {
			ctx := t.Context()
			path := filepath.Join(t.TempDir(), "keys.db")
			db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)")
			if err != nil {
				t.Fatal(err)
			}
			stmts := append(slices.Clone(migrations[:version]), fmt.Sprintf("PRAGMA user_version = %d", version),
				`INSERT INTO usage (client, day, model, requests, prompt_tokens, completion_tokens) VALUES ('key_a', '2030-03-01', 'm', 2, 100, 50)`)
			for _, stmt := range stmts {
				if _, err := db.Exec(stmt); err != nil {
					t.Fatal(err)
				}
			}
			db.Close()

			st, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			var got int
			if err := st.DB().QueryRow("PRAGMA user_version").Scan(&got); err != nil || got != len(migrations) {
				t.Errorf("schema version %d (%v), want %d", got, err, len(migrations))
			}
			row := store.UsageRow{Client: "key_a", Day: "2030-03-01", Model: "m", Requests: 2, PromptTokens: 100, CompletionTokens: 50}
			if rows, err := st.UsageSince(ctx, "key_a", "2030-03-01"); err != nil || len(rows) != 1 || rows[0] != row {
				t.Errorf("usage after the upgrade %+v (%v), want %+v", rows, err, row)
			}
			more := store.UsageRow{Client: "key_a", Day: "2030-03-01", Model: "m", Requests: 1, PromptTokens: 30, CompletionTokens: 20,
				CachedTokens: 16, ReasoningTokens: 8, Cost: 1_234_567}
			if err := st.AddUsage(ctx, store.UsageBatch{Rows: []store.UsageRow{more}}); err != nil {
				t.Fatal(err)
			}
			row.Add(more)
			if rows, err := st.UsageSince(ctx, "key_a", "2030-03-01"); err != nil || len(rows) != 1 || rows[0] != row {
				t.Errorf("usage after adding to it %+v (%v), want %+v", rows, err, row)
			}
		})
	}
}
