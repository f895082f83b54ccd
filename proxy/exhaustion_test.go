package proxy

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// wantCheck asserts what e decides of a request of model at now.
func wantCheck(t *testing.T, e *exhaustion, model string, now time.Time, refused bool, wait time.Duration) {
	t.Helper()
	gotWait, gotRefused, _ := e.check(context.Background(), model, now)
	if gotRefused != refused || (refused && gotWait != wait) {
		t.Errorf("check(%q) = %v refused %v, want %v refused %v", model, gotWait, gotRefused, wait, refused)
	}
}

func TestExhaustionScopes(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	e := newExhaustion(time.Minute, nil, zap.NewNop())

	// A model's spent tokens, 720h away: that model alone, for the bound.
	e.heard(limitWord{modelUntil: t0.Add(720 * time.Hour)}, "m1", 200, t0, t0)
	wantCheck(t, e, "", t0, false, 0)
	wantCheck(t, e, "m2", t0, false, 0)
	wantCheck(t, e, "m1", t0, true, time.Minute)
	// Answers before the lockout ends leave it: an instance that did not
	// know yet, say.
	e.heard(limitWord{}, "m1", 200, t0.Add(time.Second), t0.Add(2*time.Second))
	wantCheck(t, e, "m1", t0.Add(59*time.Second), true, time.Second)

	// Past the bound one probe goes; the others wait for the next.
	t1 := t0.Add(time.Minute)
	wantCheck(t, e, "m1", t1, false, 0)
	wantCheck(t, e, "m1", t1.Add(time.Second), true, 9*time.Second)
	// The probe is refused again: locked for the bound again.
	e.heard(limitWord{modelUntil: t1.Add(720 * time.Hour)}, "m1", 429, t1, t1.Add(2*time.Second))
	wantCheck(t, e, "m1", t1.Add(3*time.Second), true, 59*time.Second)

	// An answer to a request sent before the lockout was heard proves
	// nothing; one sent after opens the model.
	t2 := t1.Add(2*time.Second + time.Minute)
	wantCheck(t, e, "m1", t2, false, 0) // the probe
	e.heard(limitWord{}, "m1", 200, t1, t2.Add(time.Second))
	wantCheck(t, e, "m1", t2.Add(10*time.Second), false, 0) // the next probe
	e.heard(limitWord{}, "m1", 200, t2, t2.Add(11*time.Second))
	wantCheck(t, e, "m1", t2.Add(11*time.Second), false, 0)
	wantCheck(t, e, "m1", t2.Add(11*time.Second), false, 0)
	if n := e.nmodels.Load(); n != 0 {
		t.Errorf("%d model scopes kept once open, want 0", n)
	}

	// The key: a short reset of its own ends without a probe.
	e.heard(limitWord{keyUntil: t2.Add(time.Hour + 7*time.Second)}, "m2", 429, t2, t2)
	e.heard(limitWord{keyUntil: t2.Add(7 * time.Second)}, "", 429, t2, t2)
	wantCheck(t, e, "", t2, true, time.Minute)
	e2 := newExhaustion(time.Minute, nil, zap.NewNop())
	e2.heard(limitWord{keyUntil: t2.Add(7 * time.Second)}, "", 429, t2, t2)
	wantCheck(t, e2, "", t2, true, 7*time.Second)
	for range 3 {
		wantCheck(t, e2, "", t2.Add(7*time.Second), false, 0)
	}
}

func TestExhaustionBoundsModels(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	e := newExhaustion(time.Minute, nil, zap.NewNop())
	for i := range 3 * maxModelScopes {
		now := t0.Add(time.Duration(i) * time.Millisecond)
		e.heard(limitWord{modelUntil: now.Add(time.Hour)}, "m"+strconv.Itoa(i), 200, now, now)
	}
	if n := len(e.models); n > maxModelScopes || int(e.nmodels.Load()) != n {
		t.Errorf("%d model scopes (counted %d), want at most %d", n, e.nmodels.Load(), maxModelScopes)
	}
	// The latest are kept.
	last := "m" + strconv.Itoa(3*maxModelScopes-1)
	wantCheck(t, e, last, t0.Add(time.Second), true, time.Minute-time.Second+time.Duration(3*maxModelScopes-1)*time.Millisecond)
}

// fakeFleet is a SharedExhaustion in memory, for two exhaustions.
type fakeFleet struct {
	mu     sync.Mutex
	words  map[string]ScopeWord
	claims map[string]time.Time
	now    time.Time
}

func (f *fakeFleet) Publish(_ context.Context, w ScopeWord) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if cur, ok := f.words[w.Scope]; !ok || w.Until.After(cur.Until) {
		f.words[w.Scope] = w
	}
	return nil
}

func (f *fakeFleet) Clear(_ context.Context, scope string, sent time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if cur, ok := f.words[scope]; ok && cur.Noted.Before(sent) {
		delete(f.words, scope)
		delete(f.claims, scope)
	}
	return nil
}

func (f *fakeFleet) Fetch(context.Context) ([]ScopeWord, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []ScopeWord
	for _, w := range f.words {
		out = append(out, w)
	}
	return out, nil
}

func (f *fakeFleet) ClaimProbe(_ context.Context, scope string, every time.Duration) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if at, ok := f.claims[scope]; ok && f.now.Sub(at) < every {
		return false, nil
	}
	f.claims[scope] = f.now
	return true, nil
}

// Two instances: what one hears, the other adopts; past the bound, one
// probe for both; its success opens the scope for both.
func TestExhaustionFleet(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	fleet := &fakeFleet{words: map[string]ScopeWord{}, claims: map[string]time.Time{}, now: t0}
	a := newExhaustion(time.Minute, fleet, zap.NewNop())
	b := newExhaustion(time.Minute, fleet, zap.NewNop())
	a.heard(limitWord{modelUntil: t0.Add(720 * time.Hour)}, "m1", 200, t0, t0)
	waitPublished := func(scopes int) {
		t.Helper()
		for range 200 {
			fleet.mu.Lock()
			n := len(fleet.words)
			fleet.mu.Unlock()
			if n == scopes {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		t.Fatalf("the fleet does not hold %d scopes", scopes)
	}
	waitPublished(1)
	words, _ := fleet.Fetch(context.Background())
	b.adopt(words, t0.Add(time.Second))
	wantCheck(t, b, "m1", t0.Add(time.Second), true, 59*time.Second)
	wantCheck(t, b, "m2", t0.Add(time.Second), false, 0)

	// A claim far past the bound, written by anyone, is held to it.
	b.adopt([]ScopeWord{{Scope: KeyScope, Until: t0.Add(100000 * time.Second), Noted: t0}}, t0.Add(time.Second))
	wantCheck(t, b, "", t0.Add(time.Second), true, time.Minute)

	t1 := t0.Add(time.Minute + time.Second)
	fleet.now = t1
	wantCheck(t, a, "m1", t1, false, 0) // a's probe
	wantCheck(t, b, "m1", t1, true, 10*time.Second)
	a.heard(limitWord{}, "m1", 200, t1, t1.Add(time.Second))
	waitPublished(0) // a cleared it
	words, _ = fleet.Fetch(context.Background())
	b.adopt(words, t1.Add(2*time.Second))
	wantCheck(t, b, "m1", t1.Add(2*time.Second), false, 0)
	wantCheck(t, a, "m1", t1.Add(2*time.Second), false, 0)
}

// BenchmarkExhaustionCheck is the request path's two looks while nothing
// is spent.
func BenchmarkExhaustionCheck(b *testing.B) {
	e := newExhaustion(time.Minute, nil, zap.NewNop())
	now := time.Now()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, refused, _ := e.check(ctx, "", now); refused {
			b.Fatal("refused")
		}
		if _, refused, _ := e.check(ctx, "vigthoria-fast-1", now); refused {
			b.Fatal("refused")
		}
	}
}

// A model's lockout noted while other requests of it are checked is
// never lost to them.
func TestExhaustionNoteBesideChecks(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	for range 50 {
		e := newExhaustion(time.Minute, nil, zap.NewNop())
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for range 50 {
					e.check(context.Background(), "m1", t0)
				}
			})
		}
		e.heard(limitWord{modelUntil: t0.Add(time.Hour)}, "m1", 200, t0, t0)
		wg.Wait()
		wantCheck(t, e, "m1", t0, true, time.Minute)
	}
}
