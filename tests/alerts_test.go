package tests

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"github.com/openai/openai-go/v3"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/internal/hooktest"
	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// alertsBlock is an alerts block POSTing to url, signed with
// hooktest.Secret through the environment.
func alertsBlock(t *testing.T, url string) string {
	t.Setenv("VIGTHORIA_WEBHOOK_SECRET", hooktest.Secret)
	return "alerts {\n\t\t\twebhook " + url + "\n\t\t\tsecret {env.VIGTHORIA_WEBHOOK_SECRET}\n\t\t}"
}

// TestQuotaAlertsWebhook: a caller chatting through its daily quota of
// 1000 tokens sets off exactly two webhooks, the 80% crossing and the
// refusal when its next chat does not fit what is left (use never
// reaches 100%: no 100% alert), each signed, each delivered once
// although the receiver failed its first attempt.
func TestQuotaAlertsWebhook(t *testing.T) {
	r := hooktest.New(t, hooktest.Secret)
	r.FailFirst = 1
	e := start(t, manyFailures, "tier metered {\n\t\t\tquota 1000/day\n\t\t\tmax_tokens 40\n\t\t}", alertsBlock(t, r.URL))
	id, secret := e.addKey(t, "metered")
	e.waitKeysKnown(t)
	client := newClient(e.caddy.URL, secret)
	params := chatParams("alerts")
	params.MaxTokens = openai.Int(40)

	var used int64
	refused := false
	for range 200 {
		res, err := client.Chat.Completions.New(t.Context(), params)
		if err != nil {
			wantOpenAIError(t, err, http.StatusTooManyRequests, "insufficient_quota")
			refused = true
			break
		}
		used += res.Usage.TotalTokens
	}
	if !refused || used < 800 {
		t.Fatalf("after %d tokens the quota had not refused", used)
	}
	// The first attempts failed: the retries come 2.5 to 5s later.
	bodies := r.WaitAccepted(2, 20*time.Second)
	time.Sleep(200 * time.Millisecond) // a third alert would arrive by now
	bodies = r.Bodies()
	// Retried with jitter, they may arrive in either order.
	slices.SortFunc(bodies, func(a, b hooktest.Body) int { return strings.Compare(a.Type, b.Type) })
	if len(bodies) != 2 {
		t.Fatalf("%d webhooks accepted, want 2: %+v", len(bodies), bodies)
	}
	today := time.Now().UTC().Format("2006-01-02")
	for i, typ := range []string{"quota", "quota_refused"} {
		b := bodies[i]
		if b.Type != typ || b.KeyID != id || b.KeyName != "test-metered" || b.Tier != "metered" ||
			b.Period != today || b.Limit != 1000 {
			t.Errorf("webhook %d = %+v, want the %s alert of %s", i, b, typ, id)
		}
	}
	if b := bodies[0]; b.Percent != 80 || b.Used < 800 || b.Used >= 1000 || b.Requested != nil {
		t.Errorf("the crossing says %d%%, used %d, requested %v: want 80%%, 800 to 999, no request", b.Percent, b.Used, b.Requested)
	}
	if b := bodies[1]; b.Used != used || b.Percent != 0 || b.Requested == nil || b.Used+*b.Requested <= 1000 {
		t.Errorf("the refusal says used %d, %d%%, requested %v: want %d, what the caller used, no threshold, and a request that did not fit",
			b.Used, b.Percent, b.Requested, used)
	}
	attempts := r.Attempts()
	for wid, n := range r.Accepted() {
		if n != 1 || attempts[wid] != 2 {
			t.Errorf("webhook-id %s accepted %d times in %d attempts, want once in 2", wid, n, attempts[wid])
		}
	}
	wantMetric(t, e, "vigthoria_alerts_delivered_total", 2)
}

// TestBudgetAlertsWebhook: a caller spending its budget in money sets
// off the 80% budget alert and the refusal, once each, its figures in
// micro-units of the currency.
func TestBudgetAlertsWebhook(t *testing.T) {
	r := hooktest.New(t, hooktest.Secret)
	e := start(t, manyFailures, testPrices, "tier metered {\n\t\t\tbudget 0.01/day\n\t\t}", alertsBlock(t, r.URL))
	id, key := e.addKey(t, "metered")
	e.waitKeysKnown(t)
	chats := 0
	for ; chats < 100; chats++ {
		if status, _, body := budgetChat(t, e.caddy.URL, key, model); status != http.StatusOK {
			if status != http.StatusTooManyRequests || !strings.Contains(body, "budget") {
				t.Fatalf("chat %d: %d %s", chats+1, status, body)
			}
			break
		}
	}
	r.WaitAccepted(2, 10*time.Second)
	time.Sleep(200 * time.Millisecond) // a third alert would arrive by now
	bodies := r.Bodies()
	slices.SortFunc(bodies, func(a, b hooktest.Body) int { return strings.Compare(a.Type, b.Type) })
	if len(bodies) != 2 {
		t.Fatalf("%d webhooks accepted, want 2: %+v", len(bodies), bodies)
	}
	for i, want := range []struct {
		typ string
		pct int
	}{{"budget", 80}, {"budget_refused", 0}} {
		if b := bodies[i]; b.Type != want.typ || b.KeyID != id || b.Limit != budget || b.Percent != want.pct {
			t.Errorf("webhook %d = %+v, want the %s alert of %s, at %d%%, of %d micro-units", i, b, want.typ, id, want.pct, budget)
		}
	}
	if spent := int64(chats * chatCost); bodies[1].Used != spent {
		t.Errorf("the refusal says %d micro-units used, want %d: what %d chats cost", bodies[1].Used, spent, chats)
	}
}

// TestRefusalIsNoCrossing: a request whose reservation does not fit a
// budget nobody has spent from is a refusal, and its alert says so: used
// 0, and what it asked; no threshold is said crossed.
func TestRefusalIsNoCrossing(t *testing.T) {
	r := hooktest.New(t, hooktest.Secret)
	e := start(t, builtinDefaultCap, manyFailures, testPrices, "tier metered {\n\t\t\tbudget 0.001/day\n\t\t}", alertsBlock(t, r.URL))
	id, key := e.addKey(t, "metered")
	e.waitKeysKnown(t)
	// 4096 tokens of output: 81,920 micro-units.
	client := newClient(e.caddy.URL, key)
	params := chatParams("hi")
	params.MaxTokens = openai.Int(4096)
	_, err := client.Chat.Completions.New(t.Context(), params)
	oe := wantOpenAIError(t, err, http.StatusTooManyRequests, "insufficient_quota")
	if !strings.Contains(oe.Message, "left of the budget") {
		t.Errorf("the refusal says %q, want that the request does not fit what is left", oe.Message)
	}
	r.WaitAccepted(1, 10*time.Second)
	time.Sleep(200 * time.Millisecond) // a second alert would arrive by now
	bodies := r.Bodies()
	if len(bodies) != 1 {
		t.Fatalf("%d webhooks accepted, want 1: %+v", len(bodies), bodies)
	}
	if b := bodies[0]; b.Type != "budget_refused" || b.KeyID != id || b.Used != 0 || b.Limit != 1000 || b.Percent != 0 ||
		b.Requested == nil || *b.Requested < 81_920 {
		t.Errorf("webhook %+v, want the budget_refused alert of %s, used 0, requested at least 81920", b, id)
	}
}

// wantMetric asserts that the admin API's /metrics shows at least want
// for an unlabelled counter.
func wantMetric(t *testing.T, e *env, name string, want float64) {
	t.Helper()
	res, err := http.Get(e.caddy.AdminURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var buf bytes.Buffer
	buf.ReadFrom(res.Body)
	for line := range strings.Lines(buf.String()) {
		var got float64
		if _, err := fmt.Sscanf(line, name+" %g", &got); err == nil {
			if got < want {
				t.Errorf("%s = %v, want at least %v", name, got, want)
			}
			return
		}
	}
	t.Errorf("no %s in /metrics", name)
}

// storeClaimer claims alerts in a key store.
type storeClaimer struct{ store.Backend }

func (c storeClaimer) Claim(ctx context.Context, id string, until time.Time) (bool, error) {
	return c.ClaimAlert(ctx, id, until)
}

// TestAlertsOncePerFleet: instances sharing a store (one Redis, or one
// SQLite file), each with its own Notifier and Sender, noting the same
// crossings at the same moment, send each alert once.
func TestAlertsOncePerFleet(t *testing.T) {
	for name, open := range map[string]func(t *testing.T) func() store.Backend{
		"redis": func(t *testing.T) func() store.Backend {
			url := redistest.Start(t).URL
			return func() store.Backend {
				st, err := redisstore.Open(url)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { st.Close() })
				return st
			}
		},
		"sqlite": func(t *testing.T) func() store.Backend {
			path := t.TempDir() + "/keys.db"
			return func() store.Backend {
				st, err := sqlite.Open(path)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { st.Close() })
				return st
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			r := hooktest.New(t, hooktest.Secret)
			secret, err := alerts.ParseSecret(hooktest.Secret)
			if err != nil {
				t.Fatal(err)
			}
			openStore := open(t)
			const instances = 4
			notifiers := make([]*alerts.Notifier, instances)
			for i := range notifiers {
				s := alerts.NewSender(alerts.SenderConfig{URL: r.URL, Secret: secret})
				n, err := alerts.NewNotifier(alerts.Config{Thresholds: alerts.DefaultThresholds, Claimer: storeClaimer{openStore()}, Webhook: s})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(s.Close)
				t.Cleanup(n.Close)
				notifiers[i] = n
			}
			var wg sync.WaitGroup
			for _, n := range notifiers {
				for k := range 10 {
					wg.Go(func() {
						n.Note(alerts.Figure{Type: alerts.Budget, KeyID: fmt.Sprint("key_", k), Tier: "pro", Period: "2026-12", Used: 50, Limit: 50})
					})
				}
			}
			wg.Wait()
			r.WaitAccepted(20, 10*time.Second)
			time.Sleep(200 * time.Millisecond) // duplicates would arrive by now
			if got := len(r.Bodies()); got != 20 {
				t.Errorf("%d webhooks, want 20: 10 keys at 80%% and 100%%", got)
			}
			for wid, n := range r.Accepted() {
				if n != 1 {
					t.Errorf("webhook-id %s accepted %d times, want once", wid, n)
				}
			}
		})
	}
}

// TestAlertSenderFollowsConfig: the webhook's sender survives a reload
// that keeps it, and none is left once a config without it is loaded or
// Caddy stops.
func TestAlertSenderFollowsConfig(t *testing.T) {
	r := hooktest.New(t, hooktest.Secret)
	block := alertsBlock(t, r.URL)
	e := start(t, block)
	wantSenders(t, 1)
	e.reload(t, block)
	wantSenders(t, 1)
	e.reload(t)
	wantSenders(t, 0)
	e.reload(t, block)
	wantSenders(t, 1)
	e.caddy.Stop(t)
	wantSenders(t, 0)
}

// wantSenders asserts how many alert webhook senders run.
func wantSenders(t *testing.T, want int) {
	t.Helper()
	buf := make([]byte, 1<<22)
	stacks := string(buf[:runtime.Stack(buf, true)])
	if got := strings.Count(stacks, "alerts.(*Sender).run("); got != want {
		t.Errorf("%d alert senders running, want %d", got, want)
	}
}

// TestAlertsConfigRefused: a webhook secret that is not a whsec_ secret,
// or a webhook that is not an http(s) URL, refuses the config with an
// error that does not repeat the secret; validating a good one leaves no
// sender behind.
func TestAlertsConfigRefused(t *testing.T) {
	check := func(webhook, secret string) error {
		t.Helper()
		t.Setenv("VIGTHORIA_WEBHOOK_SECRET", secret)
		return validate(t, "tier free", "alerts {\n\t\t\twebhook "+webhook+"\n\t\t\tsecret {env.VIGTHORIA_WEBHOOK_SECRET}\n\t\t}")
	}
	for name, c := range map[string]struct{ webhook, secret string }{
		"no prefix":     {"https://hooks.example.com/a", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
		"not base64":    {"https://hooks.example.com/a", "whsec_MfKQ9r8GKYqrTwjUPD8I!PZIo2LaLaSw"},
		"too short":     {"https://hooks.example.com/a", "whsec_MfKQ9r8GKYqrTwjU"},
		"empty":         {"https://hooks.example.com/a", ""},
		"not a web URL": {"ftp://hooks.example.com/a", hooktest.Secret},
		"no host":       {"https:///a", hooktest.Secret},
	} {
		t.Run(name, func(t *testing.T) {
			err := check(c.webhook, c.secret)
			if err == nil {
				t.Fatal("the config was accepted")
			}
			if c.secret != "" && strings.Contains(err.Error(), strings.TrimPrefix(c.secret, "whsec_")) {
				t.Errorf("the error repeats the secret: %v", err)
			}
		})
	}
	if err := check("https://hooks.example.com/a", hooktest.Secret); err != nil {
		t.Errorf("a good alerts block: %v", err)
	}
	wantSenders(t, 0)
}
