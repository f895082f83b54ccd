package admission

import (
	"math"
	"testing"
	"time"
)

// The pace holds nothing until the upstream speaks; then it is cut to
// what the upstream served, grows while it is silent, and is forgotten.
func TestPace(t *testing.T) {
	var p pace
	now := time.Unix(1_700_000_000, 0)
	for range 1000 {
		if w := p.take(now); w != 0 {
			t.Fatalf("nothing learned, yet held for %v", w)
		}
	}
	// 100 served in the second before the upstream said the key is spent.
	for i := range 100 {
		p.answered(now.Add(time.Duration(i) * 10 * time.Millisecond))
	}
	now = now.Add(time.Second)
	p.spent(now)
	if math.Abs(p.rate-70) > 1e-9 {
		t.Fatalf("cut to %v a second, want 70: 0.7 of the 100 served", p.rate)
	}
	p.spent(now.Add(500 * time.Millisecond)) // the same burst
	if math.Abs(p.rate-70) > 1e-9 {
		t.Errorf("a second cut within a second: %v, want 70 still", p.rate)
	}
	// Over the next second, 70 go, about one each 1/70 s.
	sent := 0
	for at := now; at.Before(now.Add(time.Second)); at = at.Add(time.Millisecond) {
		for p.take(at) == 0 {
			sent++
		}
	}
	if sent < 69 || sent > 71 {
		t.Errorf("%d let through in the second after the cut, want 70", sent)
	}
	// Ten seconds of silence from a second after the cut: it grew.
	later := now.Add(11 * time.Second)
	p.take(later)
	if want := 70 * (1 + 10*paceGrowth); math.Abs(p.rate-want) > 1 {
		t.Errorf("after 10 s of growth, %v a second, want about %v", p.rate, want)
	}
	// A cut takes the lower of the pace and what was served.
	for range 500 {
		p.answered(later)
	}
	p.spent(later.Add(100 * time.Millisecond))
	if want := paceCut * 70 * (1 + 10*paceGrowth); math.Abs(p.rate-want) > 1 {
		t.Errorf("cut below the pace: %v, want about %v", p.rate, want)
	}
	// Forgotten after long silence.
	if w := p.take(later.Add(paceForget + time.Minute)); w != 0 || p.rate != 0 {
		t.Errorf("after %v of silence: held %v at %v a second, want nothing learned", paceForget, w, p.rate)
	}
}

// A cut never stops everything: with nothing served, the pace is one a
// second.
func TestPaceNeverStops(t *testing.T) {
	var p pace
	now := time.Unix(1_700_000_000, 0)
	p.spent(now)
	if p.rate != paceMin {
		t.Fatalf("rate %v, want %v", p.rate, paceMin)
	}
	if w := p.take(now.Add(time.Second)); w != 0 {
		t.Errorf("a second after the cut, held %v", w)
	}
}
