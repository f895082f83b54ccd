package pause

import (
	"context"
	"testing"
	"time"
)

func TestFor(t *testing.T) {
	if !For(t.Context(), time.Millisecond) {
		t.Error("a wait that ran its course reported otherwise")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if For(ctx, time.Hour) {
		t.Error("a wait whose context ended reported it waited the whole time")
	}
}
