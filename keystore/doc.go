// Package keystore holds the proxy's client keys: their format, how they
// are made and rotated, the in-memory index that identifies a caller
// without touching a store, minted tokens and their signing keys, OpenID
// verification, the `caddy vigthoria` command and the admin API routes
// under /vigthoria/. It keeps keys, usage and signing keys through a
// store.Backend, and counts usage with a ledger.Ledger.
//
// It may import store, ledger, policy and keystore/clientkey; never a
// store backend (store/sqlite, store/redis), which the root registers.
package keystore
