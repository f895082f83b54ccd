// Package sqlite is the embedded store backend: one SQLite file (pure Go
// driver, WAL) for keys, the usage ledger, signing keys and alert claims.
// It owns the whole schema and its migrations, and registers itself as
// the "sqlite" kind of store.
//
// It may import store and policy.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	// The pure Go SQLite driver, registered as "sqlite": no cgo.
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
	_ "modernc.org/sqlite"
)

// busyTimeout is how long a write waits for another connection's or
// process's write to finish.
const busyTimeout = 5 * time.Second

// migrations bring a database to the schema version of their count, in
// order: migrations[i] goes from version i to i+1. Only ever append.
var migrations = []string{
	// 1: client keys. Times are unix milliseconds, 0 for none. seq orders
	// inserts, rotations and revocations for Changes; its counter lives in
	// sequences, so that it never goes back.
	`CREATE TABLE keys (
		id        TEXT PRIMARY KEY,
		name      TEXT NOT NULL,
		tier      TEXT NOT NULL,
		hash      BLOB NOT NULL,
		created   INTEGER NOT NULL,
		expires   INTEGER NOT NULL DEFAULT 0,
		revoked   INTEGER NOT NULL DEFAULT 0,
		last_used INTEGER NOT NULL DEFAULT 0,
		seq       INTEGER NOT NULL
	) STRICT;
	CREATE INDEX keys_seq ON keys (seq);
	CREATE TABLE sequences (
		name  TEXT PRIMARY KEY,
		value INTEGER NOT NULL
	) STRICT;
	INSERT INTO sequences (name, value) VALUES ('keys', 0);`,
	// 2: the usage ledger.
	ledgerSchema,
	// 3: the ledger's cached and reasoning tokens.
	ledgerDetailsSchema,
	// 4: the tiers a key may mint tokens of, joined by ','; '' for none,
	// which is what the keys of older versions get.
	`ALTER TABLE keys ADD COLUMN mint TEXT NOT NULL DEFAULT '';`,
	// 5: the keys minted tokens are signed with. private is the 32-byte
	// Ed25519 seed; created is unix milliseconds.
	`CREATE TABLE signing_keys (
		id      TEXT PRIMARY KEY,
		private BLOB NOT NULL,
		created INTEGER NOT NULL
	) STRICT;`,
	// 6: the ledger's cost.
	ledgerCostSchema,
	// 7: a key's own settings, as JSON (see Settings); '' for none, which
	// is what the keys of older versions get.
	`ALTER TABLE keys ADD COLUMN settings TEXT NOT NULL DEFAULT '';`,
	// 8: claims on alerts, so that one instance of a fleet sends each.
	// until is unix milliseconds; an expired claim is deleted by the next.
	`CREATE TABLE alert_claims (
		id    TEXT PRIMARY KEY,
		until INTEGER NOT NULL
	) STRICT;
	CREATE INDEX alert_claims_until ON alert_claims (until);`,
	// 9: the ledger's hourly rows, for the dashboard.
	ledgerHoursSchema,
	// 10: the ledger's refusals by hour, for the dashboard.
	refusalsHoursSchema,
	// 11: the ledger's usage and refusals by 5 minutes, for the
	// dashboard's last 24 hours.
	ledgerSlotsSchema,
}

const recordColumns = `id, name, tier, hash, created, expires, revoked, last_used, mint, settings, seq`

// Store is a store.Backend in one SQLite file, in WAL mode so that several
// processes (Caddy instances, the CLI) can use it at once. The file holds
// key hashes, never secrets. It is safe for concurrent use. Use
// Open to make one.
type Store struct {
	db   *sql.DB
	path string
}

// Open opens the SQLite key store at path, creating the file and
// its directory (private to the user) when missing, and migrates it to
// the current schema.
func Open(path string) (*Store, error) {
	if path == "" {
		return nil, errors.New("opening key store: empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("opening key store %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o700); err != nil {
		return nil, fmt.Errorf("opening key store: %w", err)
	}
	// SQLite would create the file with the umask's mode; create it
	// private first. The -wal and -shm files take the database's mode.
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening key store: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("opening key store: %w", err)
	}

	// Every connection gets the pragmas; write transactions begin
	// IMMEDIATE, taking the write lock up front so that busy_timeout
	// applies instead of failing on a lock upgrade.
	q := url.Values{
		"_pragma": {
			fmt.Sprintf("busy_timeout(%d)", busyTimeout.Milliseconds()),
			"journal_mode(WAL)",
			"synchronous(NORMAL)",
			"foreign_keys(1)",
		},
		"_txlock": {"immediate"},
	}
	uriPath := filepath.ToSlash(abs)
	if !strings.HasPrefix(uriPath, "/") {
		uriPath = "/" + uriPath // a Windows drive letter
	}
	dsn := (&url.URL{Scheme: "file", Path: uriPath, RawQuery: q.Encode()}).String()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("opening key store %s: %w", abs, err)
	}
	s := &Store{db: db, path: abs}
	if err := s.migrate(context.Background()); err != nil {
		db.Close()
		return nil, fmt.Errorf("opening key store %s: %w", abs, err)
	}
	return s, nil
}

// migrate brings the schema to len(migrations) in one transaction, so
// that two processes opening a new file at once migrate it once.
func (s *Store) migrate(ctx context.Context) error {
	var mode string
	if err := s.db.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		return fmt.Errorf("reading journal mode: %w", err)
	}
	if !strings.EqualFold(mode, "wal") {
		return fmt.Errorf("journal mode is %q, not WAL: is the file on a file system without shared memory?", mode)
	}
	version, err := s.schemaVersion(ctx, s.db)
	if err != nil || version == len(migrations) {
		return err
	}
	return s.write(ctx, func(tx *sql.Tx) error {
		// Read again under the write lock: another process may have
		// migrated meanwhile.
		version, err := s.schemaVersion(ctx, tx)
		if err != nil {
			return err
		}
		for ; version < len(migrations); version++ {
			if _, err := tx.ExecContext(ctx, migrations[version]); err != nil {
				return fmt.Errorf("migrating schema to version %d: %w", version+1, err)
			}
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", version)); err != nil {
			return fmt.Errorf("setting schema version: %w", err)
		}
		return nil
	})
}

// schemaVersion reads the schema version and refuses one newer than this
// build knows: a newer build migrated the file, and this one would
// misread what it added. Nothing is changed; the fix is the newer binary.
func (s *Store) schemaVersion(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}) (int, error) {
	var version int
	if err := q.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return 0, fmt.Errorf("reading schema version: %w", err)
	}
	if version > len(migrations) {
		return 0, fmt.Errorf("schema version %d is newer than this build of caddy-vigthoria knows (version %d): "+
			"a newer build has upgraded the store; run that build or a later one (a store is never downgraded)", version, len(migrations))
	}
	return version, nil
}

// Path returns the absolute path of the database file.
func (s *Store) Path() string { return s.path }

// DB returns the store's database, for tools and tests that look behind
// the store. Writing to it bypasses the store's rules.
func (s *Store) DB() *sql.DB { return s.db }

// Insert adds a new key.
func (s *Store) Insert(ctx context.Context, r store.Record) error {
	settings, err := store.EncodeSettings(r.Settings)
	if err != nil {
		return fmt.Errorf("inserting key %s: %w", r.ID, err)
	}
	err = s.write(ctx, func(tx *sql.Tx) error {
		seq, err := nextSeq(ctx, tx)
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO keys (`+recordColumns+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			r.ID, r.Name, r.Tier, r.Hash[:], store.Millis(r.Created), store.Millis(r.Expires), store.Millis(r.Revoked), store.Millis(r.LastUsed), store.JoinMint(r.Mint), settings, seq)
		return err
	})
	if err != nil {
		return fmt.Errorf("inserting key %s: %w", r.ID, err)
	}
	return nil
}

// Get returns the key with the given ID, or ErrNotFound.
func (s *Store) Get(ctx context.Context, id string) (store.Record, error) {
	r, _, err := scanRecord(s.db.QueryRowContext(ctx, `SELECT `+recordColumns+` FROM keys WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return store.Record{}, store.ErrNotFound
	}
	if err != nil {
		return store.Record{}, fmt.Errorf("reading key %s: %w", id, err)
	}
	return r, nil
}

// List returns every key, oldest first.
func (s *Store) List(ctx context.Context) ([]store.Record, error) {
	var recs []store.Record
	_, err := s.scan(ctx, 0, func(r store.Record) { recs = append(recs, r) }, `SELECT `+recordColumns+` FROM keys ORDER BY created, id`)
	if err != nil {
		return nil, fmt.Errorf("listing keys: %w", err)
	}
	return recs, nil
}

// SetHash replaces the hash of the key id; see Store.
func (s *Store) SetHash(ctx context.Context, id string, h store.Hash) error {
	if err := s.changeLive(ctx, id, "hash", h[:]); err != nil {
		return fmt.Errorf("setting hash of key %s: %w", id, err)
	}
	return nil
}

// SetSettings replaces the settings of the key id; see Store.
func (s *Store) SetSettings(ctx context.Context, id string, set policy.Settings) error {
	v, err := store.EncodeSettings(set)
	if err == nil {
		err = s.changeLive(ctx, id, "settings", v)
	}
	if err != nil {
		return fmt.Errorf("setting the settings of key %s: %w", id, err)
	}
	return nil
}

// changeLive sets the column of the live key id to v, as a change:
// ErrNotFound for an unknown key, ErrRevoked for a revoked one.
func (s *Store) changeLive(ctx context.Context, id, column string, v any) error {
	return s.write(ctx, func(tx *sql.Tx) error {
		revoked, err := revokedAt(ctx, tx, id)
		if err != nil {
			return err
		}
		if revoked != 0 {
			return store.ErrRevoked
		}
		seq, err := nextSeq(ctx, tx)
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `UPDATE keys SET `+column+` = ?, seq = ? WHERE id = ?`, v, seq, id)
		return err
	})
}

// Revoke revokes the key id at the given time; see Store.
func (s *Store) Revoke(ctx context.Context, id string, at time.Time) error {
	if at.IsZero() {
		return fmt.Errorf("revoking key %s: %w: zero revocation time", id, store.ErrInvalid)
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		revoked, err := revokedAt(ctx, tx, id)
		if err != nil || revoked != 0 {
			return err
		}
		seq, err := nextSeq(ctx, tx)
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `UPDATE keys SET revoked = ?, seq = ? WHERE id = ?`, store.Millis(at), seq, id)
		return err
	})
	if err != nil {
		return fmt.Errorf("revoking key %s: %w", id, err)
	}
	return nil
}

// Changes returns the keys changed after cursor; see Store.
func (s *Store) Changes(ctx context.Context, cursor uint64) ([]store.Record, uint64, error) {
	var recs []store.Record
	last, err := s.scan(ctx, cursor, func(r store.Record) { recs = append(recs, r) },
		`SELECT `+recordColumns+` FROM keys WHERE seq > ? ORDER BY seq`, int64(min(cursor, math.MaxInt64)))
	if err != nil {
		return nil, cursor, fmt.Errorf("reading key changes: %w", err)
	}
	return recs, last, nil
}

// CountKeys returns the number of keys, revoked ones included.
func (s *Store) CountKeys(ctx context.Context) (int, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM keys`).Scan(&n); err != nil {
		return 0, fmt.Errorf("counting keys: %w", err)
	}
	return n, nil
}

// LoadAll passes every key to f, batch records at a time, and returns
// the Changes cursor that follows them. One statement reads them all, in
// table order: one snapshot, so that the cursor matches what f got.
func (s *Store) LoadAll(ctx context.Context, batch int, f func([]store.Record)) (uint64, error) {
	recs := make([]store.Record, 0, batch)
	cursor, err := s.scan(ctx, 0, func(r store.Record) {
		if recs = append(recs, r); len(recs) == batch {
			f(recs)
			recs = recs[:0]
		}
	}, `SELECT `+recordColumns+` FROM keys`)
	if err != nil {
		return 0, fmt.Errorf("loading keys: %w", err)
	}
	f(recs)
	return cursor, nil
}

// TouchLastUsed raises last-used times in one transaction; see Store.
func (s *Store) TouchLastUsed(ctx context.Context, used map[string]time.Time) error {
	if len(used) == 0 {
		return nil
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		stmt, err := tx.PrepareContext(ctx, `UPDATE keys SET last_used = max(last_used, ?) WHERE id = ?`)
		if err != nil {
			return err
		}
		defer stmt.Close()
		for id, at := range used {
			if _, err := stmt.ExecContext(ctx, store.Millis(at), id); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("recording last use of %d keys: %w", len(used), err)
	}
	return nil
}

// SigningKeys returns every signing key, oldest first.
func (s *Store) SigningKeys(ctx context.Context) ([]store.SigningKey, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, private, created FROM signing_keys ORDER BY created, id`)
	if err != nil {
		return nil, fmt.Errorf("reading signing keys: %w", err)
	}
	defer rows.Close()
	var keys []store.SigningKey
	for rows.Next() {
		var (
			id      string
			seed    []byte
			created int64
		)
		if err := rows.Scan(&id, &seed, &created); err != nil {
			return nil, fmt.Errorf("reading signing keys: %w", err)
		}
		k, err := store.SigningKeyFromSeed(id, seed, created)
		if err != nil {
			return nil, fmt.Errorf("reading signing keys: %w", err)
		}
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("reading signing keys: %w", err)
	}
	return keys, nil
}

// AddSigningKey stores k's seed; an ID already stored is an error.
func (s *Store) AddSigningKey(ctx context.Context, k store.SigningKey) error {
	if err := store.CheckSigningKey(k); err != nil {
		return err
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO signing_keys (id, private, created) VALUES (?, ?, ?)`,
		k.ID, k.Private.Seed(), store.Millis(k.Created))
	if err != nil {
		return fmt.Errorf("adding signing key %s: %w", k.ID, err)
	}
	return nil
}

// RemoveSigningKey deletes the signing key id; an unknown ID is no error.
func (s *Store) RemoveSigningKey(ctx context.Context, id string) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM signing_keys WHERE id = ?`, id); err != nil {
		return fmt.Errorf("removing signing key %s: %w", id, err)
	}
	return nil
}

// Close closes the database.
func (s *Store) Close() error {
	return s.db.Close()
}

// write runs f in a short write transaction.
func (s *Store) write(ctx context.Context, f func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := f(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// scan runs a query for records, passing each to f, and returns the
// highest seq among them, or cursor when there are none.
func (s *Store) scan(ctx context.Context, cursor uint64, f func(store.Record), query string, args ...any) (uint64, error) {
	rows, err := s.db.QueryContext(ctx, query, args...)
	if err != nil {
		return cursor, err
	}
	defer rows.Close()
	for rows.Next() {
		r, seq, err := scanRecord(rows)
		if err != nil {
			return cursor, err
		}
		f(r)
		cursor = max(cursor, seq)
	}
	return cursor, rows.Err()
}

// nextSeq takes the next change sequence number, within tx.
func nextSeq(ctx context.Context, tx *sql.Tx) (int64, error) {
	var seq int64
	err := tx.QueryRowContext(ctx, `UPDATE sequences SET value = value + 1 WHERE name = 'keys' RETURNING value`).Scan(&seq)
	if err != nil {
		return 0, fmt.Errorf("taking a change sequence number: %w", err)
	}
	return seq, nil
}

// revokedAt returns the revocation time of the key id in unix
// milliseconds (0: live), or ErrNotFound.
func revokedAt(ctx context.Context, tx *sql.Tx, id string) (int64, error) {
	var revoked int64
	err := tx.QueryRowContext(ctx, `SELECT revoked FROM keys WHERE id = ?`, id).Scan(&revoked)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, store.ErrNotFound
	}
	return revoked, err
}

// scanRecord reads one row of recordColumns.
func scanRecord(row interface{ Scan(...any) error }) (store.Record, uint64, error) {
	var (
		r                                 store.Record
		hash                              []byte
		created, expires, revoked, usedAt int64
		mint, settings                    string
		seq                               int64
	)
	if err := row.Scan(&r.ID, &r.Name, &r.Tier, &hash, &created, &expires, &revoked, &usedAt, &mint, &settings, &seq); err != nil {
		return store.Record{}, 0, err
	}
	if len(hash) != len(r.Hash) {
		return store.Record{}, 0, fmt.Errorf("key %s has a hash of %d bytes, not %d", r.ID, len(hash), len(r.Hash))
	}
	copy(r.Hash[:], hash)
	r.Created, r.Expires, r.Revoked, r.LastUsed = store.FromMillis(created), store.FromMillis(expires), store.FromMillis(revoked), store.FromMillis(usedAt)
	r.Mint = store.SplitMint(mint)
	var err error
	if r.Settings, err = store.DecodeSettings(settings); err != nil {
		return store.Record{}, 0, fmt.Errorf("key %s: %w", r.ID, err)
	}
	return r, uint64(seq), nil
}

// Interface guards
var _ store.Backend = (*Store)(nil)

func init() {
	store.Register("sqlite", &store.Driver{
		Kind:   "sqlite",
		Target: target,
		Spec:   func(path string) string { return "sqlite:" + path },
		Open:   func(path string) (store.Backend, error) { return Open(path) },
	})
}

// target is the Driver's Target: the path of "sqlite:PATH", made
// absolute.
func target(spec string) (string, error) {
	path := strings.TrimPrefix(spec, "sqlite:")
	if path == "" {
		return "", errors.New("the sqlite store needs a path: sqlite:/var/lib/caddy/vigthoria.db")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("sqlite store path %s: %w", path, err)
	}
	return abs, nil
}
