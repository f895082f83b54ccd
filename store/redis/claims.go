package redis

import (
	"context"
	"errors"
	"fmt"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// redisClaimPrefix names an alert's claim in Redis.
const redisClaimPrefix = "vgt:alert:"

// ClaimAlert claims id with SET NX, expiring at until.
func (s *Store) ClaimAlert(ctx context.Context, id string, until time.Time) (bool, error) {
	err := s.client.SetArgs(ctx, redisClaimPrefix+id, "1", goredis.SetArgs{Mode: "NX", ExpireAt: until}).Err()
	switch {
	case errors.Is(err, goredis.Nil):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("claiming alert %s: %w", id, err)
	}
	return true, nil
}
