package limiter

import (
	"testing"
	"time"
)

func TestBucket(t *testing.T) {
	r := Rate{N: 60, Window: time.Minute, Burst: 10} // 1 a second, 10 at once
	var b bucket
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	for i := range 10 {
		if ok, _ := b.take(r, 1, now); !ok {
			t.Fatalf("take %d of the burst of 10 refused", i+1)
		}
	}
	ok, wait := b.take(r, 1, now)
	if ok || wait != time.Second {
		t.Errorf("11th take: ok=%v wait=%v, want refused with 1s", ok, wait)
	}
	if ok, _ := b.take(r, 1, now+int64(999*time.Millisecond)); ok {
		t.Error("admitted before the refill")
	}
	if ok, _ := b.take(r, 1, now+int64(time.Second)); !ok {
		t.Error("refused after the refill")
	}
	if ok, wait := b.take(r, 11, now); ok || wait != -1 {
		t.Errorf("take over the burst: ok=%v wait=%v, want never (-1)", ok, wait)
	}
}

func TestBucketDebtAndRefund(t *testing.T) {
	r := Rate{N: 100, Window: 100 * time.Second} // 1 a second, burst 100
	var b bucket
	now := int64(0)
	b.take(r, 50, now)
	b.charge(r, 120, now) // answered more than reserved: 170 used, 70 of debt
	if left, reset := b.remaining(r, now); left != 0 || reset != 170*time.Second {
		t.Errorf("in debt: remaining %d reset %v, want 0 and 170s", left, reset)
	}
	if ok, wait := b.take(r, 1, now); ok || wait != 71*time.Second {
		t.Errorf("take in debt: ok=%v wait=%v, want refused for 71s", ok, wait)
	}
	b.charge(r, -200, now) // a refund never makes the bucket fuller than full
	if left, _ := b.remaining(r, now); left != 100 {
		t.Errorf("after refund: remaining %d, want 100", left)
	}
	if !b.full(r, now) {
		t.Error("a refilled bucket is not full")
	}
}

func TestBucketFullAfterIdle(t *testing.T) {
	r := Rate{N: 10, Window: 10 * time.Second}
	var b bucket
	b.take(r, 5, 0)
	if b.full(r, int64(4*time.Second)) {
		t.Error("full before it refilled")
	}
	if !b.full(r, int64(5*time.Second)) {
		t.Error("not full once refilled")
	}
}
