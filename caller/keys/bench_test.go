package keys

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

const benchKeys = 1_000_000

// benchRecords returns n records of new keys and their secrets.
func benchRecords(b *testing.B, n int) ([]store.Record, []string) {
	b.Helper()
	recs := make([]store.Record, n)
	secrets := make([]string, n)
	created := time.Now()
	for i := range recs {
		recs[i], secrets[i] = newRecord(b, fmt.Sprintf("client-%d", i), []string{"free", "pro", "team"}[i%3])
		recs[i].Created = created
	}
	return recs, secrets
}

// heapInUse returns the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkIdentify identifies callers among 1,000,000 keys, and reports
// the memory the index holds per key.
func BenchmarkIdentify(b *testing.B) {
	recs, secrets := benchRecords(b, benchKeys)
	s := new(Service)
	before := heapInUse()
	// As Service.load does.
	s.index.grow(len(recs))
	for i := 0; i < len(recs); i += loadBatch {
		s.index.loadNew(recs[i:min(i+loadBatch, len(recs))])
	}
	s.index.trim()
	bytesPerKey := float64(heapInUse()-before) / benchKeys
	runtime.KeepAlive(recs)

	now := time.Now()
	for _, secret := range secrets { // every key used within the minute
		if _, ok := s.Identify(secret, now); !ok {
			b.Fatal("a loaded key is not identified")
		}
	}
	unknownSecret, _ := clientkey.New()
	malformed := make([]string, 1024)
	for i := range malformed {
		malformed[i] = secrets[i][:41] + "!"
	}
	run := func(name string, key func(i int) string, want bool) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, ok := s.Identify(key(i), now); ok != want {
					b.Fatalf("Identify = %v, want %v", ok, want)
				}
				if i++; i == len(secrets) {
					i = 0
				}
			}
			b.ReportMetric(bytesPerKey, "B/key")
		})
	}
	run("known", func(i int) string { return secrets[i] }, true)
	run("unknown", func(int) string { return unknownSecret }, false)
	run("known-hot", func(i int) string { return secrets[i%1024] }, true) // a working set that stays in cache
	run("malformed", func(i int) string { return malformed[i%len(malformed)] }, false)
	b.Run("known-parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				if _, ok := s.Identify(secrets[i], now); !ok {
					b.Error("a loaded key is not identified")
					return
				}
				if i += 7919; i >= len(secrets) {
					i -= len(secrets)
				}
			}
		})
	})
}

// BenchmarkLoadSQLite measures Start on a SQLite store of 1,000,000 keys:
// opening it, reading every key and building the index.
func BenchmarkLoadSQLite(b *testing.B) {
	path := filepath.Join(b.TempDir(), "keys.db")
	st, err := sqlite.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	recs, secrets := benchRecords(b, benchKeys)
	if err := insertAll(b.Context(), st, recs); err != nil {
		b.Fatal(err)
	}
	st.Close()
	recs = nil

	for b.Loop() {
		s, err := NewService("sqlite:"+path, nil)
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Start(); err != nil {
			b.Fatal(err)
		}
		if _, ok := s.Identify(secrets[len(secrets)/2], time.Now()); !ok {
			b.Fatal("a stored key is not identified")
		}
		b.StopTimer()
		if err := s.Stop(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(benchKeys), "keys")
}

// insertAll stores recs in one transaction, as a bulk import would:
// Insert's transaction per key would take minutes for a million.
func insertAll(ctx context.Context, st *sqlite.Store, recs []store.Record) error {
	tx, err := st.DB().BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO keys (id, name, tier, hash, created, expires, revoked, last_used, mint, settings, seq) VALUES (?, ?, ?, ?, ?, 0, 0, 0, ?)`)
	if err != nil {
		return err
	}
	for i, r := range recs {
		if _, err := stmt.ExecContext(ctx, r.ID, r.Name, r.Tier, r.Hash[:], store.Millis(r.Created), i+1); err != nil {
			return err
		}
	}
	if _, err := tx.ExecContext(ctx, `UPDATE sequences SET value = ? WHERE name = 'keys'`, len(recs)); err != nil {
		return err
	}
	return tx.Commit()
}
