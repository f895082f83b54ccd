package keys

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/store"
	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// TestClaimAlert: on each backend, two stores on the same file or Redis,
// claiming the same alert from many goroutines at once, win it once; a
// claim expires at its until, and then the alert may be claimed again.
func TestClaimAlert(t *testing.T) {
	for name, open := range map[string]func(t *testing.T) (store.Backend, store.Backend){
		"sqlite": func(t *testing.T) (store.Backend, store.Backend) {
			a, path := openTemp(t)
			b, err := sqlite.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.Close() })
			return a, b
		},
		"redis": func(t *testing.T) (store.Backend, store.Backend) {
			a, srv := openRedisTemp(t)
			b, err := redisstore.Open(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.Close() })
			return a, b
		},
	} {
		t.Run(name, func(t *testing.T) {
			a, b := open(t)
			ctx := t.Context()
			var wins atomic.Int32
			var wg sync.WaitGroup
			until := time.Now().Add(time.Hour)
			for i := range 20 {
				st := a
				if i%2 == 1 {
					st = b
				}
				wg.Go(func() {
					won, err := st.ClaimAlert(ctx, "quota|key_a|80|2026-12", until)
					if err != nil {
						t.Error(err)
					}
					if won {
						wins.Add(1)
					}
				})
			}
			wg.Wait()
			if wins.Load() != 1 {
				t.Errorf("%d claims won, want 1", wins.Load())
			}
			if won, err := b.ClaimAlert(ctx, "quota|key_a|100|2026-12", until); !won || err != nil {
				t.Errorf("another threshold: won %v, %v; want a win", won, err)
			}

			short := time.Now().Add(50 * time.Millisecond)
			if won, err := a.ClaimAlert(ctx, "budget|key_b|80|2026-12", short); !won || err != nil {
				t.Fatalf("first claim: %v, %v", won, err)
			}
			if won, _ := b.ClaimAlert(ctx, "budget|key_b|80|2026-12", short); won {
				t.Error("a live claim was won again")
			}
			time.Sleep(time.Until(short) + 20*time.Millisecond)
			if won, err := b.ClaimAlert(ctx, "budget|key_b|80|2026-12", until); !won || err != nil {
				t.Errorf("after expiry: won %v, %v; want a win", won, err)
			}
		})
	}
}

// TestServiceClaimAlert: the Service claims in its store once started,
// and fails before.
func TestServiceClaimAlert(t *testing.T) {
	_, path := openTemp(t)
	s, err := NewService("sqlite:"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.ClaimAlert(t.Context(), "x", time.Now().Add(time.Hour)); err == nil {
		t.Error("a Service claimed before Start")
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop() })
	for i, want := range []bool{true, false} {
		if won, err := s.ClaimAlert(t.Context(), "x", time.Now().Add(time.Hour)); won != want || err != nil {
			t.Errorf("claim %d: %v, %v; want %v", i, won, err, want)
		}
	}
}
