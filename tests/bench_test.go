package tests

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
	"time"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// BenchmarkChat sends small chats through Caddy in this process, with
// this module and with plain reverse_proxy: the difference between the
// two, in time and allocations, is what the module adds to a request.
// module-minted calls with a token minted for a user of a key, whose
// requests are admitted twice: on the user's limits and on the key's.
// module-settings calls with a key of its own limits and origins, over
// its tier's. module-budget calls with prices and a budget in money on
// the key's tier, which reserves and settles each request's cost.
// module-timeouts sets header_timeout, whose round trip runs on a
// goroutine of its own, and idle_timeout.
// make bench measures the same under load, in separate processes.
func BenchmarkChat(b *testing.B) {
	up := standin.New(standin.Options{APIKey: serverKey, NoRecord: true, RateLimit: 1e12})
	srv := httptest.NewServer(up)
	b.Cleanup(srv.Close)
	b.Setenv("VIGTHORIA_TEST_KEY", serverKey)
	body := `{"model":"vigthoria-fast-1","max_tokens":16,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}`
	module := func(store string) string {
		return vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store sqlite "+store,
			"tier pro {\n\t\t\trequests 1000000000/1m\n\t\t\ttokens 1000000000000/1m\n\t\t}")
	}
	for _, tc := range []struct {
		name             string
		site             func(store string) string
		minted, settings bool
	}{
		{"plain", func(string) string {
			return "\treverse_proxy " + srv.URL + " {\n\t\theader_up Authorization \"Bearer {env.VIGTHORIA_TEST_KEY}\"\n\t}"
		}, false, false},
		{"module", module, false, false},
		{"module-minted", module, true, false},
		{"module-settings", module, false, true},
		{"module-timeouts", func(store string) string {
			return vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store sqlite "+store, "header_timeout 10m", "idle_timeout 5m",
				"tier pro {\n\t\t\trequests 1000000000/1m\n\t\t\ttokens 1000000000000/1m\n\t\t}")
		}, false, false},
		{"module-budget", func(store string) string {
			return vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store sqlite "+store, testPrices,
				"tier pro {\n\t\t\trequests 1000000000/1m\n\t\t\ttokens 1000000000000/1m\n\t\t\tbudget 1000000/month\n\t\t}")
		}, false, false},
	} {
		b.Run(tc.name, func(b *testing.B) {
			store := b.TempDir() + "/keys.db"
			key := createKey(b, store, "pro", "pro")
			if tc.settings {
				giveSettings(b, store)
			}
			c := harness.StartCaddy(b, tc.site(store), harness.Quiet())
			if tc.minted {
				key = mintFor(b, c.URL, key)
			}
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
			// Its idle connections would be taken for leaked goroutines.
			b.Cleanup(client.CloseIdleConnections)
			b.ReportAllocs()
			cpu := processCPU(b)
			defer func() { b.ReportMetric(float64(processCPU(b)-cpu)/float64(b.N)/1e3, "cpu-µs/op") }()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					req, _ := http.NewRequest(http.MethodPost, c.URL+"/v1/chat/completions", strings.NewReader(body))
					req.Header.Set("Authorization", "Bearer "+key)
					req.Header.Set("Content-Type", "application/json")
					res, err := client.Do(req)
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, res.Body)
					res.Body.Close()
					if res.StatusCode != http.StatusOK {
						b.Errorf("status %d", res.StatusCode)
						return
					}
				}
			})
		})
	}
}

// processCPU is the CPU time this process used so far, user and
// system: the client, Caddy and the upstream of BenchmarkChat together,
// whose difference between sub-benchmarks is what Caddy does
// differently. The time per request also counts waiting for a CPU; this
// does not, but the machine's drift still shows: compare sub-benchmarks
// of one run, with -count, and make bench's interleaved rounds.
func processCPU(b *testing.B) time.Duration {
	b.Helper()
	var u syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &u); err != nil {
		b.Fatal(err)
	}
	return time.Duration(u.Utime.Nano() + u.Stime.Nano())
}

// giveSettings gives every key in the SQLite store at path its own
// request limit and origins.
func giveSettings(b *testing.B, path string) {
	b.Helper()
	st, err := sqlite.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	recs, err := st.List(b.Context())
	if err != nil {
		b.Fatal(err)
	}
	s := policy.Settings{Requests: &policy.Rate{N: 1_000_000_000, Window: time.Minute}, Origins: []string{"https://app.example.com"}}
	for _, r := range recs {
		if err := keystore.SetSettings(b.Context(), st, r.ID, s); err != nil {
			b.Fatal(err)
		}
	}
}

// mintFor mints a token of tier pro for a user with the minting key, at
// the Caddy at base.
func mintFor(b *testing.B, base, key string) string {
	b.Helper()
	req, _ := http.NewRequest(http.MethodPost, base+"/vigthoria/tokens", strings.NewReader(`{"user":"bench","tier":"pro","ttl":"1h"}`))
	req.Header.Set("Authorization", "Bearer "+key)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	defer res.Body.Close()
	var m mintedToken
	if err := json.NewDecoder(res.Body).Decode(&m); err != nil || res.StatusCode != http.StatusCreated {
		b.Fatalf("minting: %d %v", res.StatusCode, err)
	}
	return m.Token
}
