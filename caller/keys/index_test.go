package keys

import (
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// newRecord returns a record of a new key, not stored anywhere, and its
// secret.
func newRecord(t testing.TB, name, tier string) (store.Record, string) {
	t.Helper()
	id, err := NewID()
	if err != nil {
		t.Fatal(err)
	}
	secret, err := clientkey.New()
	if err != nil {
		t.Fatal(err)
	}
	return store.Record{ID: id, Name: name, Tier: tier, Hash: store.HashSecret(secret), Created: time.Now()}, secret
}

// find looks secret up as Identify does, without the expiry check.
func (ix *index) find(secret string) (caller.Client, *entry) {
	h := store.HashSecret(secret)
	v := ix.view()
	e := v.lookup(&h)
	if e == nil {
		return caller.Client{}, nil
	}
	return caller.Client{ID: e.id(), Name: e.name(), Tier: v.tiers[e.tier]}, e
}

func TestIndexApply(t *testing.T) {
	var ix index
	if c, _ := ix.find("vgt_nothing"); c != (caller.Client{}) {
		t.Fatal("the empty index found a key")
	}
	a, aSecret := newRecord(t, "alice", "pro")
	b, bSecret := newRecord(t, "bob", "free")
	a.LastUsed = time.Unix(1_700_000_000, 0)
	ix.apply([]store.Record{a, b})
	for secret, want := range map[string]caller.Client{aSecret: {ID: a.ID, Name: "alice", Tier: "pro"}, bSecret: {ID: b.ID, Name: "bob", Tier: "free"}} {
		if got, _ := ix.find(secret); got != want {
			t.Errorf("found %+v, want %+v", got, want)
		}
	}
	if _, e := ix.find(aSecret); e.lastUsed.Load() != 1_700_000_000 {
		t.Errorf("lastUsed = %d, want the stored time", e.lastUsed.Load())
	}

	// The same record again adds nothing.
	entries := len(ix.view().entries)
	ix.apply([]store.Record{a, b})
	if got := len(ix.view().entries); got != entries {
		t.Errorf("re-applying unchanged records made %d entries, want %d", got, entries)
	}

	// Rotation: the old secret stops, the new one works, last use stays.
	_, e := ix.find(aSecret)
	e.lastUsed.Store(1_800_000_000)
	rotated := a
	newSecret, _ := clientkey.New()
	rotated.Hash = store.HashSecret(newSecret)
	ix.apply([]store.Record{rotated})
	if c, _ := ix.find(aSecret); c != (caller.Client{}) {
		t.Error("the rotated-away secret is still found")
	}
	got, e := ix.find(newSecret)
	if got != (caller.Client{ID: a.ID, Name: "alice", Tier: "pro"}) || e.lastUsed.Load() != 1_800_000_000 {
		t.Errorf("after rotation: %+v, lastUsed %d", got, e.lastUsed.Load())
	}

	// Other attributes change in place of the entry.
	renamed := rotated
	renamed.Name, renamed.Tier, renamed.Expires = "alice 2", "team", time.UnixMilli(1_900_000_000_000)
	ix.apply([]store.Record{renamed})
	got, e = ix.find(newSecret)
	if got != (caller.Client{ID: a.ID, Name: "alice 2", Tier: "team"}) || e.expires != 1_900_000_000_000 {
		t.Errorf("after renaming: %+v, expires %d", got, e.expires)
	}

	// Revocation removes; a revoked record never seen is ignored.
	revoked := b
	revoked.Revoked = time.Now()
	stranger, strangerSecret := newRecord(t, "x", "free")
	stranger.Revoked = time.Now()
	ix.apply([]store.Record{revoked, stranger})
	if c, _ := ix.find(bSecret); c != (caller.Client{}) {
		t.Error("a revoked key is found")
	}
	if c, _ := ix.find(strangerSecret); c != (caller.Client{}) {
		t.Error("a key loaded revoked is found")
	}
	if n := ix.size(); n != 1 {
		t.Errorf("size %d, want 1", n)
	}
}

func TestIndexSkipsWhatItCannotHold(t *testing.T) {
	var ix index
	r, secret := newRecord(t, "n", "free")
	r.ID = "key_" + strings.Repeat("x", 300)
	if skipped := ix.apply([]store.Record{r}); len(skipped) != 1 || skipped[0] != r.ID {
		t.Errorf("skipped %v, want the long ID", skipped)
	}
	if c, _ := ix.find(secret); c != (caller.Client{}) {
		t.Error("a skipped key is found")
	}
}

func TestIndexTierCounts(t *testing.T) {
	var ix index
	now := time.Now()
	var recs []store.Record
	for i, tier := range []string{"free", "free", "pro", "free", "gone"} {
		r, _ := newRecord(t, "k", tier)
		switch i {
		case 3:
			r.Expires = now.Add(-time.Second)
		case 4:
			r.Revoked = now
		}
		recs = append(recs, r)
	}
	ix.apply(recs)
	got := ix.tierCounts(now)
	if len(got) != 2 || got["free"] != 2 || got["pro"] != 1 {
		t.Errorf("tierCounts = %v, want free:2 pro:1", got)
	}
}

// TestIndexChurn adds, rotates and revokes keys at random, checking the
// index against a plain map after every step, while readers look up keys
// that never change: rebuilds and reuse of slots must never hide them.
func TestIndexChurn(t *testing.T) {
	var ix index
	stable := make([]string, 50)
	var recs []store.Record
	for i := range stable {
		var r store.Record
		r, stable[i] = newRecord(t, "stable", "free")
		recs = append(recs, r)
	}
	ix.apply(recs)
	ix.trim()

	var stop atomic.Bool
	var misses atomic.Int64
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for i := 0; !stop.Load(); i++ {
				if c, _ := ix.find(stable[i%len(stable)]); c.Name != "stable" {
					misses.Add(1)
				}
			}
		})
	}

	type key struct {
		rec    store.Record
		secret string
	}
	live := make(map[string]*key)
	var ids, dead []string
	rng := rand.New(rand.NewPCG(1, 2))
	const steps = 6000
	rebuilds := 0
	for step := range steps {
		before := ix.view().entries
		switch op := rng.IntN(10); {
		case op < 5 || len(ids) == 0:
			r, s := newRecord(t, "churn", []string{"free", "pro", "team"}[rng.IntN(3)])
			live[r.ID] = &key{r, s}
			ids = append(ids, r.ID)
			ix.apply([]store.Record{r})
		case op < 8:
			k := live[ids[rng.IntN(len(ids))]]
			dead = append(dead, k.secret)
			k.secret, _ = clientkey.New()
			k.rec.Hash = store.HashSecret(k.secret)
			ix.apply([]store.Record{k.rec})
		default:
			i := rng.IntN(len(ids))
			k := live[ids[i]]
			dead = append(dead, k.secret)
			delete(live, ids[i])
			ids[i] = ids[len(ids)-1]
			ids = ids[:len(ids)-1]
			k.rec.Revoked = time.Now()
			ix.apply([]store.Record{k.rec})
		}
		if cap(ix.view().entries) != cap(before) {
			rebuilds++
		}
		if step%500 == 0 || step == steps-1 {
			for _, k := range live {
				if c, _ := ix.find(k.secret); c.ID != k.rec.ID || c.Tier != k.rec.Tier {
					t.Fatalf("step %d: live key %s found as %+v", step, k.rec.ID, c)
				}
			}
			for _, s := range dead {
				if c, _ := ix.find(s); c != (caller.Client{}) {
					t.Fatalf("step %d: a rotated or revoked secret is found as %+v", step, c)
				}
			}
			if ix.size() != len(live)+len(stable) {
				t.Fatalf("step %d: size %d, want %d", step, ix.size(), len(live)+len(stable))
			}
		}
	}
	stop.Store(true)
	wg.Wait()
	if rebuilds < 2 {
		t.Errorf("%d rebuilds: the test did not exercise them", rebuilds)
	}
	if n := misses.Load(); n > 0 {
		t.Errorf("concurrent readers missed a stable key %d times", n)
	}
}
