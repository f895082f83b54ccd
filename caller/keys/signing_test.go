package keys

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/storecheck"
	"github.com/vigthoria/caddy-vigthoria/store"
)

var printedSigningID = regexp.MustCompile(`sig_[0-9A-Za-z]{16}`)

// newSigningKey makes a signing key created at now.
// redisSigningKey is the Redis hash of the signing keys, as the
// operators' existing data has it.
const redisSigningKey = "vgt:signing"

func newSigningKey(t *testing.T, now time.Time) store.SigningKey {
	t.Helper()
	k, err := store.NewSigningKey(now)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestNewSigningKey(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 678_901_234, time.UTC)
	a, b := newSigningKey(t, now), newSigningKey(t, now)
	if !regexp.MustCompile(`^sig_[0-9A-Za-z]{16}$`).MatchString(a.ID) {
		t.Errorf("ID %q, want sig_ and 16 base62 characters", a.ID)
	}
	if a.ID == b.ID || a.Private.Equal(b.Private) {
		t.Error("two new keys are the same")
	}
	if len(a.Private) != ed25519.PrivateKeySize {
		t.Errorf("private key of %d bytes, want %d", len(a.Private), ed25519.PrivateKeySize)
	}
	if want := now.Truncate(time.Millisecond); !a.Created.Equal(want) {
		t.Errorf("Created = %v, want %v", a.Created, want)
	}

	// Printed or marshalled by mistake, a key shows its ID only.
	asJSON, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(asJSON, &got); err != nil || len(got) != 2 || got["id"] != a.ID {
		t.Errorf("JSON %s, want the ID and the created time only", asJSON)
	}
	for _, tt := range []struct {
		name, text string
	}{
		{"%v", fmt.Sprintf("%v", a)},
		{"%+v", fmt.Sprintf("%+v", a)},
		{"%#v", fmt.Sprintf("%#v", a)},
		{"%s", fmt.Sprintf("%s", a)},
		{"%v of a pointer", fmt.Sprintf("%v", &a)},
		{"%v of a slice", fmt.Sprintf("%v", []store.SigningKey{a})},
		{"JSON", string(asJSON)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if !strings.Contains(tt.text, a.ID) {
				t.Errorf("%q does not name the key %s", tt.text, a.ID)
			}
			storecheck.WantNoPrivate(t, tt.name, tt.text, a)
		})
	}
}

func TestRetired(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	keys := []store.SigningKey{{ID: "sig_a", Created: t0}, {ID: "sig_b", Created: t0.Add(time.Hour)}, {ID: "sig_c", Created: t0.Add(30 * time.Hour)}}
	tests := []struct {
		name string
		keys []store.SigningKey
		i    int
		want time.Time
	}{
		{"oldest", keys, 0, t0.Add(time.Hour + SigningGrace)},
		{"middle", keys, 1, t0.Add(30*time.Hour + SigningGrace)},
		{"newest signs", keys, 2, time.Time{}},
		{"the only key", keys[:1], 0, time.Time{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Retired(tt.keys, tt.i); !got.Equal(tt.want) {
				t.Errorf("Retired(%d) = %v, want %v", tt.i, got, tt.want)
			}
		})
	}
	// Retired at t0+1h and the grace, so expired once MaxTokenTTL more
	// has passed.
	for _, tt := range []struct {
		name string
		i    int
		now  time.Time
		want bool
	}{
		{"within the token life", 0, t0.Add(time.Hour + SigningGrace + MaxTokenTTL), false},
		{"past the token life", 0, t0.Add(time.Hour + SigningGrace + MaxTokenTTL + time.Millisecond), true},
		{"retired lately", 1, t0.Add(31 * time.Hour), false},
		{"the newest never", 2, t0.Add(1000 * time.Hour), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := ExpiredSigningKey(keys, tt.i, tt.now); got != tt.want {
				t.Errorf("expiredSigningKey(%d, %v) = %t, want %t", tt.i, tt.now, got, tt.want)
			}
		})
	}
}

func TestSigner(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	keys := []store.SigningKey{{ID: "sig_a", Created: t0}, {ID: "sig_b", Created: t0.Add(time.Second)}, {ID: "sig_c", Created: t0.Add(time.Hour)}}
	for _, tt := range []struct {
		name string
		keys []store.SigningKey
		now  time.Time
		want string
	}{
		{"no keys", nil, t0, ""},
		{"a first key signs at once", keys[:1], t0, "sig_a"},
		{"two first keys: the oldest, on every instance", keys[:2], t0.Add(time.Second), "sig_a"},
		{"a new key once published for the grace", keys, t0.Add(time.Hour + SigningGrace), "sig_c"},
		{"not before", keys, t0.Add(time.Hour + SigningGrace - time.Millisecond), "sig_b"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := ""
			if k := Signer(tt.keys, tt.now); k != nil {
				got = k.ID
			}
			if got != tt.want {
				t.Errorf("signer = %q, want %q", got, tt.want)
			}
		})
	}
}

// forEachSigningBackend runs test on a new, empty store of each kind,
// as a store.Backend.
func forEachSigningBackend(t *testing.T, test func(t *testing.T, st store.Backend)) {
	forEachBackend(t, func(t *testing.T, st store.Backend) {
		sks, ok := st.(store.Backend)
		if !ok {
			t.Fatalf("%T is not a store.Backend", st)
		}
		test(t, sks)
	})
}

func TestSigningKeyStore(t *testing.T) {
	forEachSigningBackend(t, func(t *testing.T, st store.Backend) {
		ctx := t.Context()
		if ids := storecheck.SigningIDs(t, st); len(ids) != 0 {
			t.Fatalf("a new store has signing keys %v", ids)
		}
		now := time.Date(2030, 1, 2, 3, 4, 5, 678_901_234, time.UTC)
		newest := newSigningKey(t, now)
		oldest := newSigningKey(t, now.Add(-2*time.Hour))
		// Two created in the same millisecond are in the order of their IDs.
		tie1, tie2 := newSigningKey(t, now.Add(-time.Hour)), newSigningKey(t, now.Add(-time.Hour))
		tie1.ID, tie2.ID = "sig_0000000000000001", "sig_0000000000000002"
		for _, k := range []store.SigningKey{newest, tie2, oldest, tie1} {
			if err := st.AddSigningKey(ctx, k); err != nil {
				t.Fatal(err)
			}
		}
		want := []store.SigningKey{oldest, tie1, tie2, newest}
		keys, err := st.SigningKeys(ctx)
		if err != nil || len(keys) != len(want) {
			t.Fatalf("SigningKeys = %d keys, %v; want %d", len(keys), err, len(want))
		}
		for i, k := range keys {
			if k.ID != want[i].ID || !k.Created.Equal(want[i].Created) || !k.Private.Equal(want[i].Private) {
				t.Errorf("key %d = %s created %v, want %s created %v, and the same private key", i, k.ID, k.Created, want[i].ID, want[i].Created)
			}
		}

		// The stored seed makes the same key: what one instance signs,
		// another verifies with the public key it loaded.
		msg := []byte("header.payload")
		sig := ed25519.Sign(newest.Private, msg)
		if !ed25519.Verify(keys[3].Private.Public().(ed25519.PublicKey), msg, sig) {
			t.Error("a signature of the new key does not verify with the loaded key")
		}
		if ed25519.Verify(keys[0].Private.Public().(ed25519.PublicKey), msg, sig) {
			t.Error("a signature verifies with another key")
		}

		// An ID already stored is refused, and the stored key stays.
		again := newSigningKey(t, now.Add(time.Hour))
		again.ID = newest.ID
		if err := st.AddSigningKey(ctx, again); err == nil {
			t.Error("adding a signing key ID twice succeeded")
		} else {
			storecheck.WantNoPrivate(t, "the error", err.Error(), again)
		}
		if keys, _ := st.SigningKeys(ctx); len(keys) != 4 || !keys[3].Private.Equal(newest.Private) {
			t.Error("a refused add changed the stored key")
		}
		for _, tt := range []struct {
			name string
			k    store.SigningKey
		}{
			{"no ID", store.SigningKey{Private: newest.Private, Created: now}},
			{"no private key", store.SigningKey{ID: "sig_nokey", Created: now}},
			{"a seed for a private key", store.SigningKey{ID: "sig_seed", Private: ed25519.PrivateKey(newest.Private.Seed()), Created: now}},
		} {
			t.Run(tt.name, func(t *testing.T) {
				if err := st.AddSigningKey(ctx, tt.k); !errors.Is(err, store.ErrInvalid) {
					t.Errorf("AddSigningKey = %v, want ErrInvalid", err)
				}
			})
		}

		if err := st.RemoveSigningKey(ctx, tie1.ID); err != nil {
			t.Fatal(err)
		}
		if err := st.RemoveSigningKey(ctx, "sig_unknown"); err != nil {
			t.Errorf("removing an unknown key: %v, want nil", err)
		}
		if got, want := storecheck.SigningIDs(t, st), []string{oldest.ID, tie2.ID, newest.ID}; !slices.Equal(got, want) {
			t.Errorf("after removing %s: %v, want %v", tie1.ID, got, want)
		}
	})
}

func TestSigningKeyDamagedSeed(t *testing.T) {
	k := newSigningKey(t, time.Now())
	short := k.Private.Seed()[:31]
	tests := []struct {
		name   string
		damage func(t *testing.T) store.Backend
	}{
		{"sqlite", func(t *testing.T) store.Backend {
			st, _ := openTemp(t)
			if _, err := st.DB().Exec(`INSERT INTO signing_keys (id, private, created) VALUES (?, ?, ?)`, k.ID, short, store.Millis(k.Created)); err != nil {
				t.Fatal(err)
			}
			return st
		}},
		{"redis", func(t *testing.T) store.Backend {
			st, srv := openRedisTemp(t)
			if err := redistest.Client(t, srv.URL).HSet(t.Context(), redisSigningKey, k.ID, append(make([]byte, 8), short...)).Err(); err != nil {
				t.Fatal(err)
			}
			return st
		}},
		{"redis, shorter than its time", func(t *testing.T) store.Backend {
			st, srv := openRedisTemp(t)
			if err := redistest.Client(t, srv.URL).HSet(t.Context(), redisSigningKey, k.ID, "1234").Err(); err != nil {
				t.Fatal(err)
			}
			return st
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := tt.damage(t).SigningKeys(t.Context())
			if err == nil || !strings.Contains(err.Error(), k.ID) {
				t.Fatalf("SigningKeys = %d keys, %v; want an error naming %s", len(keys), err, k.ID)
			}
			storecheck.WantNoPrivate(t, "the error", err.Error(), k)
		})
	}
}
