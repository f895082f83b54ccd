// Package crashtest is what the stores' crash tests share: the uses and
// key changes a killed process makes, and the checks that what it
// acknowledged survived whole, and what it had in flight landed whole or
// left no trace.
package crashtest

import (
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
)

const (
	// Kills is how many times a test kills its store process.
	Kills = 50

	// A store process is killed this long after its first write, at
	// random between the two.
	MinRun = 20 * time.Millisecond
	MaxRun = 200 * time.Millisecond

	// StartTimeout bounds the wait for a store process's first
	// write: a race-enabled binary starting on a busy machine.
	StartTimeout = 30 * time.Second

	// LedgerFlush is how often a store process flushes its ledger:
	// every few kills find usage both stored and pending.
	LedgerFlush = 20 * time.Millisecond
)

// The tiers, clients and models a store process uses.
var (
	Tiers   = []string{"free", "pro"}
	Clients = []string{"key_crashAlice", "key_crashBob", "key_crashCarol", "key_crashDave"}
	Models  = []string{"vigthoria-fast-1", "vigthoria-pro-1"}
)

// Key names a usage row of the crash tests' models.
type Key struct{ Client, Day, Model string }

// Use is one use a store process added to its ledger, and when.
type Use struct {
	Row store.UsageRow
	At  time.Time
}

// CompareLedger checks that the stored ledger is the model's plus every
// acknowledged batch, plus the batch in flight whole or not at all, and
// reports whether that batch landed.
func CompareLedger(t *testing.T, kill int, model, stored map[Key]store.UsageRow, flushed, batch []Use) (landed bool) {
	t.Helper()
	acked := WithUses(model, flushed)
	withBatch := WithUses(acked, batch)
	landed = batch != nil && maps.Equal(stored, withBatch)
	if !maps.Equal(stored, acked) && !landed {
		t.Errorf("kill %d: the ledger differs from its acknowledged batches%s", kill, UsageDiff(stored, acked))
		if batch != nil {
			t.Errorf("kill %d: and from those plus the batch in flight%s", kill, UsageDiff(stored, withBatch))
		}
	}
	return landed
}

// WithUses returns a copy of rows with uses added.
func WithUses(rows map[Key]store.UsageRow, uses []Use) map[Key]store.UsageRow {
	sum := maps.Clone(rows)
	for _, u := range uses {
		k := Key{u.Row.Client, u.Row.Day, u.Row.Model}
		r := sum[k]
		r.Client, r.Day, r.Model = k.Client, k.Day, k.Model
		r.Requests += u.Row.Requests
		r.PromptTokens += u.Row.PromptTokens
		r.CompletionTokens += u.Row.CompletionTokens
		sum[k] = r
	}
	return sum
}

// UsageDiff lists the rows where got differs from want.
func UsageDiff(got, want map[Key]store.UsageRow) string {
	var b strings.Builder
	both := maps.Clone(want)
	maps.Copy(both, got)
	for k := range both {
		if g, w := got[k], want[k]; g != w {
			fmt.Fprintf(&b, "\n\t%s %s %s: %d requests, %d+%d tokens; want %d, %d+%d",
				k.Client, k.Day, k.Model, g.Requests, g.PromptTokens, g.CompletionTokens, w.Requests, w.PromptTokens, w.CompletionTokens)
		}
	}
	return b.String()
}

// SameRecord reports whether two records are the same key in the same
// state.
func SameRecord(a, b store.Record) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Tier == b.Tier && a.Hash == b.Hash &&
		a.Created.Equal(b.Created) && a.Expires.Equal(b.Expires) &&
		a.Revoked.Equal(b.Revoked) && a.LastUsed.Equal(b.LastUsed)
}

// CheckAcknowledged checks that stored holds every acknowledged key as
// acknowledged, and nothing else but what the change in flight (op on
// inflight, the key as that change would leave it) made, whole or not at
// all. It reports whether that change landed, and the ID of a key it
// created.
func CheckAcknowledged(t *testing.T, kill int, stored, acked map[string]store.Record, op string, inflight *store.Record) (landed bool, created string) {
	t.Helper()
	for id, want := range acked {
		if _, ok := stored[id]; !ok {
			t.Errorf("kill %d: acknowledged key %s (%s, %s) is gone", kill, id, want.Name, want.Tier)
		}
	}
	for id, got := range stored {
		want, known := acked[id]
		switch {
		case known && inflight != nil && id == inflight.ID:
			// Cut by the kill: as acknowledged before it, or as after it.
			after := *inflight
			if op == "rotate" {
				after.Hash = got.Hash // the new secret was never shown
			}
			if !SameRecord(got, want) && !SameRecord(got, after) {
				t.Errorf("kill %d: key %s, cut in its %s, is %+v\nwant %+v\nor   %+v", kill, id, op, got, want, after)
			}
			landed = !SameRecord(got, want)
		case known:
			if !SameRecord(got, want) {
				t.Errorf("kill %d: key %s is %+v\nacknowledged as %+v", kill, id, got, want)
			}
		case op == "create" && created == "":
			after := *inflight
			after.ID, after.Hash = id, got.Hash // never acknowledged
			if !SameRecord(got, after) {
				t.Errorf("kill %d: key %s, created as the kill came, is %+v\nwant %+v", kill, id, got, after)
			}
			landed, created = true, id
		default:
			t.Errorf("kill %d: key %s (%s) is stored, but no change in flight made it", kill, id, got.Name)
		}
	}
	return landed, created
}

// Cuts counts the changes a kill cut, by whether they landed whole or
// left no trace.
type Cuts struct{ Landed, Lost int }

// Add counts one run: whether a change was in flight, and if it landed.
func (c *Cuts) Add(inFlight, landed bool) {
	switch {
	case !inFlight:
	case landed:
		c.Landed++
	default:
		c.Lost++
	}
}

func (c Cuts) String() string {
	return fmt.Sprintf("%d landed whole, %d left no trace", c.Landed, c.Lost)
}
