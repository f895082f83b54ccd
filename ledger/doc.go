// Package ledger counts what each caller used and was refused: usage rows
// by day, hour and 5-minute slot, refusals by hour and slot, the uses
// recorded while they run (Begin, Finish), and the reads behind quotas,
// budgets, /v1/usage and the dashboard. Adding is in memory; the pending
// rows are written in batches through a store.Backend, and every read
// merges them into the stored ones with one merge.
//
// It may import the standard library, zap and store.
package ledger
