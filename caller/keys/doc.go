// Package keys holds the proxy's client keys: how they are made and
// rotated, the in-memory index that identifies a caller without touching
// a store (the identity source of client keys), the tokens a key mints
// and their signing keys, and the registry of started services that
// Caddy's admin API manages. It keeps keys, usage and signing keys
// through a store.Backend, and counts usage with a ledger.Ledger.
//
// It may import caller, caller/token, store, ledger and policy; never a
// store backend (store/sqlite, store/redis), which the root registers.
package keys
