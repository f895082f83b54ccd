package ledger

import (
	"fmt"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
)

// Refuse counts one request of client that the proxy refused for reason
// at t. The counts are kept by hour (HourRetention) and by 5-minute slot
// (SlotRetention) only, not in the daily rows: quotas and usage answers never see them. A reason that
// ValidReason refuses is not counted, and the error says so.
func (l *Ledger) Refuse(client, reason string, at time.Time) error {
	if !store.ValidReason(reason) {
		return fmt.Errorf("counting a refusal: %w: reason '%s' is not 1 to %d bytes of a-z, 0-9 and _", store.ErrInvalid, reason, store.MaxReasonLen)
	}
	l.mu.Lock()
	k := rowKey{client, l.slotName(at), reason}
	l.refusals[k] = store.AddCount(l.refusals[k], 1)
	l.mu.Unlock()
	return nil
}
