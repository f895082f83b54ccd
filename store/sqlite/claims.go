package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// ClaimAlert claims id with INSERT … ON CONFLICT DO NOTHING, in the
// transaction that first deletes the expired claims.
func (s *Store) ClaimAlert(ctx context.Context, id string, until time.Time) (bool, error) {
	var won bool
	err := s.write(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `DELETE FROM alert_claims WHERE until <= ?`, store.Millis(time.Now())); err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `INSERT INTO alert_claims (id, until) VALUES (?, ?) ON CONFLICT (id) DO NOTHING`,
			id, store.Millis(until))
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		won = n == 1
		return err
	})
	if err != nil {
		return false, fmt.Errorf("claiming alert %s: %w", id, err)
	}
	return won, nil
}
