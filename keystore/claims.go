package keystore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// AlertClaimer is a Store that records claims on alerts, so that each
// alert is sent by one instance of a fleet only; SQLite and Redis both
// are.
type AlertClaimer interface {
	// ClaimAlert reports true to the first caller to claim id, whichever
	// process it is in, and false to every later one until the claim
	// expires at until (to the millisecond).
	ClaimAlert(ctx context.Context, id string, until time.Time) (bool, error)
}

// redisClaimPrefix names an alert's claim in Redis.
const redisClaimPrefix = "vgt:alert:"

// ClaimAlert claims id with INSERT … ON CONFLICT DO NOTHING, in the
// transaction that first deletes the expired claims.
func (s *SQLite) ClaimAlert(ctx context.Context, id string, until time.Time) (bool, error) {
	var won bool
	err := s.write(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `DELETE FROM alert_claims WHERE until <= ?`, millis(time.Now())); err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, `INSERT INTO alert_claims (id, until) VALUES (?, ?) ON CONFLICT (id) DO NOTHING`,
			id, millis(until))
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

// ClaimAlert claims id with SET NX, expiring at until.
func (s *Redis) ClaimAlert(ctx context.Context, id string, until time.Time) (bool, error) {
	err := s.client.SetArgs(ctx, redisClaimPrefix+id, "1", redis.SetArgs{Mode: "NX", ExpireAt: until}).Err()
	switch {
	case errors.Is(err, redis.Nil):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("claiming alert %s: %w", id, err)
	}
	return true, nil
}

// ClaimAlert claims an alert in the Service's store (see AlertClaimer).
// It fails before Start and after Stop.
func (s *Service) ClaimAlert(ctx context.Context, id string, until time.Time) (bool, error) {
	st, ok := s.Store().(AlertClaimer)
	if !ok {
		return false, errors.New("claiming an alert: the key store is not open")
	}
	return st.ClaimAlert(ctx, id, until)
}

// Interface guards
var (
	_ AlertClaimer = (*SQLite)(nil)
	_ AlertClaimer = (*Redis)(nil)
)
