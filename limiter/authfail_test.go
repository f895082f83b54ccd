package limiter

import (
	"net/netip"
	"testing"
	"time"
)

func TestFailureThrottle(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ft := NewFailureThrottle(3, time.Minute, 1000)
	a := netip.MustParseAddr("192.0.2.1")
	b := netip.MustParseAddr("192.0.2.2")

	for i := range 3 {
		if _, blocked := ft.Blocked(a, t0); blocked {
			t.Fatalf("blocked after %d failures, limit 3", i)
		}
		ft.Fail(a, t0.Add(time.Duration(i)*time.Second))
	}
	wait, blocked := ft.Blocked(a, t0.Add(10*time.Second))
	if !blocked || wait != 50*time.Second {
		t.Errorf("after 3 failures: blocked=%v wait=%v, want true 50s", blocked, wait)
	}
	if _, blocked := ft.Blocked(b, t0); blocked {
		t.Error("another address is blocked")
	}
	if _, blocked := ft.Blocked(a, t0.Add(time.Minute)); blocked {
		t.Error("still blocked when the window has passed")
	}
	// A new window starts counting from zero.
	ft.Fail(a, t0.Add(time.Minute))
	if _, blocked := ft.Blocked(a, t0.Add(time.Minute)); blocked {
		t.Error("blocked after one failure in a new window")
	}
}

func TestFailureThrottleIPv6CountsPer64(t *testing.T) {
	t0 := time.Now()
	ft := NewFailureThrottle(2, time.Minute, 1000)
	ft.Fail(netip.MustParseAddr("2001:db8:1:2::1"), t0)
	ft.Fail(netip.MustParseAddr("2001:db8:1:2:ffff::9"), t0)
	if _, blocked := ft.Blocked(netip.MustParseAddr("2001:db8:1:2::abcd"), t0); !blocked {
		t.Error("failures from one /64 were not counted together")
	}
	if _, blocked := ft.Blocked(netip.MustParseAddr("2001:db8:1:3::1"), t0); blocked {
		t.Error("another /64 is blocked")
	}
	// IPv4-mapped IPv6 is the IPv4 address.
	ft.Fail(netip.MustParseAddr("::ffff:192.0.2.7"), t0)
	ft.Fail(netip.MustParseAddr("192.0.2.7"), t0)
	if _, blocked := ft.Blocked(netip.MustParseAddr("192.0.2.7"), t0); !blocked {
		t.Error("an IPv4-mapped address was counted apart from its IPv4 form")
	}
}

func TestFailureThrottleIsBounded(t *testing.T) {
	t0 := time.Now()
	const max = 64 * 10
	ft := NewFailureThrottle(1, time.Minute, max)
	for i := range 100_000 {
		ft.Fail(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), t0)
	}
	if n := ft.Tracked(); n > max {
		t.Errorf("tracking %d addresses, bound %d", n, max)
	}
}

func BenchmarkFailureThrottleBlocked(b *testing.B) {
	ft := NewFailureThrottle(20, time.Minute, 1<<20)
	addr := netip.MustParseAddr("192.0.2.1")
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		ft.Blocked(addr, now)
	}
}
