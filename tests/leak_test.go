package tests

import (
	"bytes"
	"crypto/rand"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"github.com/redis/go-redis/v9"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// TestNoSecretLeaks runs the proxy's scenarios with a random server key and
// random client keys, Caddy logging at debug level, then searches every
// log, every answer (headers and body), the key store's files, the admin
// API's config and the autosaved config for each secret, whole and its
// last 8 characters.
func TestNoSecretLeaks(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) { testNoSecretLeaks(t, "") })
	t.Run("redis", func(t *testing.T) { testNoSecretLeaks(t, redistest.Start(t).URL) })
}

// testNoSecretLeaks runs the scenarios with the SQLite store, or with the
// Redis at redisURL, whose every key and value is searched too.
func testNoSecretLeaks(t *testing.T, redisURL string) {
	serverSecret := "vig-" + rand.Text() + rand.Text()
	up := standin.New(standin.Options{APIKey: serverSecret})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	t.Setenv("VIGTHORIA_LEAK_KEY", serverSecret)
	db := filepath.Join(t.TempDir(), "keys.db")
	storeLine := "store sqlite " + db
	var keys []string
	if redisURL == "" {
		keys = []string{createKey(t, db, "metered"), createKey(t, db, "metered")}
	} else {
		storeLine = "store redis " + redisURL
		st, err := redisstore.Open(redisURL)
		if err != nil {
			t.Fatal(err)
		}
		for range 2 {
			_, secret, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "leak", Tier: "metered"}, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			keys = append(keys, secret)
		}
		st.Close()
	}
	site := func(extra string) string {
		return vigthoriaBlock(srv.URL+"/v1", "{env.VIGTHORIA_LEAK_KEY}", storeLine, "retries 1", manyFailures,
			"tier metered {\n\t\t\trequests 6/1h\n\t\t\tmodels vigthoria-fast-*\n\t\t\tmax_tokens 64\n\t\t}", extra)
	}
	c := harness.StartCaddy(t, site("max_body 1MB"), harness.Persist())

	var answers bytes.Buffer
	send := func(method, path, key, body string, header ...string) int {
		t.Helper()
		req, _ := http.NewRequestWithContext(t.Context(), method, c.URL+path, strings.NewReader(body))
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		req.Header.Set("Content-Type", "application/json")
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer res.Body.Close()
		res.Header.Write(&answers)
		io.Copy(&answers, res.Body)
		return res.StatusCode
	}
	chat := `{"model":"vigthoria-fast-1","messages":[{"role":"user","content":"hi"}]}`
	scenarios := []struct {
		name               string
		method, path, body string
		key                string
		header             []string
		behavior           standin.Behavior
	}{
		{name: "chat", method: "POST", path: "/v1/chat/completions", body: chat, key: keys[0]},
		{name: "stream", method: "POST", path: "/v1/chat/completions", body: `{"model":"vigthoria-fast-1","stream":true,"messages":[{"role":"user","content":"hi"}]}`, key: keys[0]},
		{name: "models", method: "GET", path: "/v1/models", key: keys[0]},
		{name: "usage", method: "GET", path: "/v1/usage", key: keys[0]},
		{name: "bad key", method: "POST", path: "/v1/chat/completions", body: chat, key: keys[1][:20] + "x" + keys[1][21:]},
		{name: "key in a header of its own", method: "GET", path: "/v1/models", header: []string{"X-Api-Key", keys[1]}},
		{name: "key in the query", method: "GET", path: "/v1/models?api_key=" + keys[1], key: keys[1]},
		{name: "key in the query, no Authorization", method: "GET", path: "/v1/models?x=" + keys[1]},
		{name: "key in the path", method: "GET", path: "/v1/models/" + keys[1], key: keys[0]},
		{name: "key in a header named otherwise", method: "POST", path: "/v1/chat/completions", body: chat, key: keys[0], header: []string{"X-Auth-Token", keys[1]}},
		{name: "model outside the tier", method: "POST", path: "/v1/chat/completions", body: `{"model":"vigthoria-pro-1","messages":[]}`, key: keys[1]},
		{name: "max_tokens over the cap", method: "POST", path: "/v1/chat/completions", body: `{"model":"vigthoria-fast-1","max_tokens":999,"messages":[]}`, key: keys[1]},
		{name: "not JSON", method: "POST", path: "/v1/chat/completions", body: "x", key: keys[1]},
		{name: "unknown path", method: "GET", path: "/v1/files", key: keys[1]},
		{name: "upstream 500", method: "POST", path: "/v1/chat/completions", body: chat, key: keys[1], behavior: standin.Behavior{FailStatus: 500, FailCount: 2}},
		{name: "retried 503", method: "POST", path: "/v1/chat/completions", body: chat, key: keys[1], behavior: standin.Behavior{FailStatus: 503, FailCount: 1}},
		{name: "broken stream", method: "POST", path: "/v1/chat/completions", body: `{"model":"vigthoria-fast-1","stream":true,"messages":[]}`, key: keys[1], behavior: standin.Behavior{FailMidStream: 2}},
		{name: "limit reached", method: "POST", path: "/v1/chat/completions", body: chat, key: keys[0]},
	}
	for _, sc := range scenarios {
		up.SetBehavior(sc.behavior)
		send(sc.method, sc.path, sc.key, sc.body, sc.header...)
	}
	for range 4 { // exhaust the first key's 6 requests
		send("POST", "/v1/chat/completions", keys[0], chat)
	}
	up.SetBehavior(standin.Behavior{})
	if err := c.Load(site("max_body 2MB")); err != nil { // a reload
		t.Fatal(err)
	}
	closeIdle()
	send("POST", "/v1/chat/completions", keys[1], chat)

	// A server key the upstream refuses: the 502 must not echo anything.
	bad := standin.New(standin.Options{APIKey: "another-key"})
	badSrv := httptest.NewServer(bad)
	t.Cleanup(badSrv.Close)
	if err := c.Load(vigthoriaBlock(badSrv.URL+"/v1", "{env.VIGTHORIA_LEAK_KEY}", storeLine, "tier metered")); err != nil {
		t.Fatal(err)
	}
	closeIdle()
	if s := send("POST", "/v1/chat/completions", keys[1], chat); s != http.StatusBadGateway {
		t.Errorf("refused server key: status %d, want 502", s)
	}

	config, err := http.Get(c.AdminURL + "/config/")
	if err != nil {
		t.Fatal(err)
	}
	configBody, _ := io.ReadAll(config.Body)
	config.Body.Close()
	// Let the last access log lines and the ledger's batch land.
	c.WaitLog(t, `"status":502`)

	haystacks := map[string][]byte{"answers": answers.Bytes(), "GET /config/": configBody}
	for name, path := range map[string]string{
		"caddy.log": c.LogPath, "autosave.json": c.AutosavePath(),
		"keys.db": db, "keys.db-wal": db + "-wal", "keys.db-shm": db + "-shm",
	} {
		b, err := os.ReadFile(path)
		if err != nil && !strings.HasPrefix(name, "keys.db") {
			t.Fatalf("reading %s: %v", name, err)
		}
		haystacks[name] = b
	}
	if redisURL != "" {
		haystacks["redis"] = dumpRedis(t, redisURL)
	}
	if len(haystacks["autosave.json"]) == 0 || !bytes.Contains(haystacks["autosave.json"], []byte("{env.VIGTHORIA_LEAK_KEY}")) {
		t.Error("the autosaved config is missing or lacks the api_key placeholder")
	}
	searched := 0
	for name, hay := range haystacks {
		searched += len(hay)
		for _, secret := range append([]string{serverSecret}, keys...) {
			for _, needle := range []string{secret, secret[len(secret)-8:]} {
				if bytes.Contains(hay, []byte(needle)) {
					t.Errorf("a secret (%d chars) appears in %s", len(needle), name)
				}
			}
		}
	}
	t.Logf("%d scenarios, %d bytes searched in %d places", len(scenarios)+3, searched, len(haystacks))
}

// dumpRedis returns every key and value in the Redis at url.
func dumpRedis(t *testing.T, url string) []byte {
	t.Helper()
	opts, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	client := redis.NewClient(opts)
	defer client.Close()
	ctx := t.Context()
	var dump bytes.Buffer
	iter := client.Scan(ctx, 0, "*", 1000).Iterator()
	for iter.Next(ctx) {
		key := iter.Val()
		dump.WriteString(key + "\n")
		v, err := client.Dump(ctx, key).Result()
		if err != nil {
			t.Fatalf("dumping %s: %v", key, err)
		}
		dump.WriteString(v + "\n")
		// DUMP's format may compress; the plain values too.
		switch client.Type(ctx, key).Val() {
		case "string":
			dump.WriteString(client.Get(ctx, key).Val())
		case "hash":
			for f, v := range client.HGetAll(ctx, key).Val() {
				dump.WriteString(f + "=" + v + "\n")
			}
		case "zset":
			for _, m := range client.ZRange(ctx, key, 0, -1).Val() {
				dump.WriteString(m + "\n")
			}
		}
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	if dump.Len() == 0 {
		t.Fatal("Redis holds nothing: the scenarios did not use it")
	}
	return dump.Bytes()
}
