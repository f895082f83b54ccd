package vigthoria

import "testing"

// TestLabelCacheIsBounded checks that the cache answers what its child
// function answers, keeps at most maxCachedLabels children, and makes each
// cached child once.
func TestLabelCacheIsBounded(t *testing.T) {
	made := 0
	c := newLabelCache(func(k int) int { made++; return 2 * k })
	const n = maxCachedLabels + 10
	for range 2 {
		for k := range n {
			if got := c.get(k); got != 2*k {
				t.Fatalf("get(%d) = %d, want %d", k, got, 2*k)
			}
		}
	}
	if len(c.m) != maxCachedLabels {
		t.Errorf("the cache holds %d children, want %d", len(c.m), maxCachedLabels)
	}
	if want := maxCachedLabels + 2*10; made != want {
		t.Errorf("children made %d times, want %d: the cached ones once, the others each time", made, want)
	}
}
