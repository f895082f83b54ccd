package ledger

import (
	"path/filepath"
	"strconv"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// The Redis layout the ledger's tests look at, spelled out here as the
// operators' existing data has it, so that a change to it fails them.
const (
	redisUsagePrefix  = "vgt:usage:"
	redisHourPrefix   = "vgt:usage-hour:"
	redisSlotPrefix   = "vgt:usage-slot:"
	redisWriterPrefix = "vgt:usage-writer:"
)

// usageKey names a client's day of usage in Redis.
func usageKey(client, day string) string { return redisUsagePrefix + client + ":" + day }

// hourField begins a client's fields in an hour's or a slot's hash.
func hourField(client string) string { return strconv.Itoa(len(client)) + ":" + client }

// openTemp opens a new SQLite store, closed at the end of the test.
func openTemp(t *testing.T) (*sqlite.Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keys.db")
	st, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, path
}

// openRedisTemp starts a redis-server for the test and opens a store on
// it, closed at the end of the test.
func openRedisTemp(t *testing.T) (*redisstore.Store, *redistest.Server) {
	t.Helper()
	srv := redistest.Start(t)
	st, err := redisstore.Open(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, srv
}
