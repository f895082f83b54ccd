package keys

import (
	"context"
	"errors"
	"time"
)

// ClaimAlert claims an alert in the Service's store (see
// store.Backend.ClaimAlert). It fails before Start and after Stop.
func (s *Service) ClaimAlert(ctx context.Context, id string, until time.Time) (bool, error) {
	st := s.Store()
	if st == nil {
		return false, errors.New("claiming an alert: the key store is not open")
	}
	return st.ClaimAlert(ctx, id, until)
}
