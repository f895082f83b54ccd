// Package rediserr tells Redis' own refusals from failures that pass, for
// the wings that retry writes to Redis (the ledger, the limiter's
// settles): a refusal is given up, anything else is retried.
package rediserr

import (
	"errors"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Refused reports whether err is Redis refusing a command or script
// itself (an ERR or WRONGTYPE reply), which no retry would change. A
// Redis that is unreachable, loading, busy, out of memory, a replica or
// out of client connections is not a refusal: it passes.
func Refused(err error) bool {
	var e redis.Error
	if !errors.As(err, &e) || redis.IsMaxClientsError(err) {
		return false
	}
	msg := e.Error()
	return strings.HasPrefix(msg, "ERR ") || strings.HasPrefix(msg, "WRONGTYPE ")
}
