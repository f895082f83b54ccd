package keys

import (
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// fullSettings sets every field.
func fullSettings() policy.Settings {
	conc, maxTok := 5, int64(2048)
	return policy.Settings{
		Requests:   &policy.Rate{N: 100, Window: time.Minute},
		Tokens:     &policy.Rate{N: 200_000, Window: time.Minute, Burst: 50_000},
		Concurrent: &conc,
		Quota:      &policy.Amount{N: 10_000_000, Period: "month"},
		Budget:     &policy.Amount{N: 50_000_000, Period: "month"},
		Models:     []string{"vigthoria-fast-*"},
		MaxTokens:  &maxTok,
		Origins:    []string{"https://app.acme.com", "http://localhost:3000"},
	}
}

// TestCreateChecksSettings: Create refuses settings that Check refuses.
func TestCreateChecksSettings(t *testing.T) {
	bad := policy.Settings{Models: []string{"a["}}
	if _, _, err := Create(t.Context(), nil, Attrs{Name: "a", Tier: "pro", Settings: bad}, time.Now()); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("Create with bad settings: %v, want ErrInvalid", err)
	}
}

// TestStoreKeepsSettings: settings are stored with a key, replaced and
// cleared by SetSettings, which is a change; rotation keeps them.
func TestStoreKeepsSettings(t *testing.T) {
	forEachBackend(t, func(t *testing.T, st store.Backend) {
		ctx := t.Context()
		now := time.Now()
		full := fullSettings()
		r, _ := createWith(t, st, Attrs{Name: "acme", Tier: "pro", Settings: full}, now)
		plain, _ := create(t, st, "plain", "free", time.Time{}, now)
		got, err := st.Get(ctx, r.ID)
		if err != nil {
			t.Fatal(err)
		}
		wantRecord(t, got, r)
		if got, _ := st.Get(ctx, plain.ID); !got.Settings.IsZero() {
			t.Errorf("a key without settings reads %+v", got.Settings)
		}
		_, cursor, err := st.Changes(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}

		budget := policy.Amount{N: 80_000_000, Period: "month"}
		r.Settings.Budget, r.Settings.Requests = &budget, nil
		if err := SetSettings(ctx, st, r.ID, r.Settings); err != nil {
			t.Fatal(err)
		}
		recs, next, err := st.Changes(ctx, cursor)
		if err != nil || len(recs) != 1 || next <= cursor {
			t.Fatalf("Changes after SetSettings = %d records, cursor %d→%d, %v; want 1", len(recs), cursor, next, err)
		}
		wantRecord(t, recs[0], r)

		secret, err := Rotate(ctx, st, r.ID)
		if err != nil {
			t.Fatal(err)
		}
		r.Hash = store.HashSecret(secret)
		if got, _ := st.Get(ctx, r.ID); !reflect.DeepEqual(got.Settings, r.Settings) {
			t.Errorf("after a rotation settings = %+v, want %+v", got.Settings, r.Settings)
		}

		if err := SetSettings(ctx, st, r.ID, policy.Settings{}); err != nil {
			t.Fatal(err)
		}
		r.Settings = policy.Settings{}
		got, _ = st.Get(ctx, r.ID)
		wantRecord(t, got, r)

		if err := SetSettings(ctx, st, "key_unknown", full); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("SetSettings of an unknown key: %v, want ErrNotFound", err)
		}
		if err := SetSettings(ctx, st, r.ID, policy.Settings{Models: []string{}}); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("SetSettings with bad settings: %v, want ErrInvalid", err)
		}
		if err := st.Revoke(ctx, r.ID, now); err != nil {
			t.Fatal(err)
		}
		if err := SetSettings(ctx, st, r.ID, full); !errors.Is(err, store.ErrRevoked) {
			t.Errorf("SetSettings of a revoked key: %v, want ErrRevoked", err)
		}
	})
}

// TestServiceSettings: Identify hands out a key's settings, the same
// pointer until they change, a new one within a sync of a change, and
// nil once cleared.
func TestServiceSettings(t *testing.T) {
	s, cli := startService(t, nil)
	full := fullSettings()
	r, secret := createWith(t, cli, Attrs{Name: "acme", Tier: "pro", Settings: full}, time.Now())
	_, plainSecret := create(t, cli, "plain", "free", time.Time{}, time.Now())
	testcheck.Within(t, "the keys are loaded", func() bool { return identified(s, secret) && identified(s, plainSecret) })
	c, _ := s.Identify(secret, time.Now())
	if c.Settings == nil || !reflect.DeepEqual(*c.Settings, full) || s.Settings(r.ID) != c.Settings {
		t.Fatalf("Identify gave settings %+v, want %+v, the same as Settings(id)", c.Settings, full)
	}
	if p, _ := s.Identify(plainSecret, time.Now()); p.Settings != nil {
		t.Errorf("a key without settings got %+v", p.Settings)
	}

	// A rotation keeps the pointer: caches keyed by it stay warm.
	if _, err := Rotate(t.Context(), cli, r.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * s.poll)
	if s.Settings(r.ID) != c.Settings {
		t.Error("a rotation changed the settings' pointer")
	}

	changed := full
	changed.Requests = nil
	if err := SetSettings(t.Context(), cli, r.ID, changed); err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "the change is seen", func() bool { n := s.Settings(r.ID); return n != nil && n.Requests == nil })
	if c.Settings.Requests == nil {
		t.Error("the settings handed out before were changed in place")
	}
	if err := SetSettings(t.Context(), cli, r.ID, policy.Settings{}); err != nil {
		t.Fatal(err)
	}
	testcheck.Within(t, "clearing is seen", func() bool { return s.Settings(r.ID) == nil })
	if s.index.settings.Load() != nil {
		t.Error("the settings map is kept though no key has settings")
	}
}
