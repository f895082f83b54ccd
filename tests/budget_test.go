package tests

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// Prices of the budget tests: 10 and 20 micro-units a token. A small
// chat of the stand-in (4 prompt tokens, 16 answered) costs 360
// micro-units, and reserves more (its prompt's estimate is larger).
const (
	testPrices = "prices {\n\t\t\tvigthoria-fast-* input 10 output 20\n\t\t}"
	chatCost   = 4*10 + 16*20
	budget     = 10_000 // 0.01 a day: 27 such chats and some change
)

// budgetChat sends a small chat with key to base and returns its status
// and the headers of a refusal.
func budgetChat(t *testing.T, base, key, model string) (int, http.Header, string) {
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/v1/chat/completions",
		strings.NewReader(`{"model":"`+model+`","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Errorf("chat: %v", err)
		return 0, nil, ""
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	return res.StatusCode, res.Header, string(body)
}

// spendConcurrently has 50 callers chat with key until the budget
// refuses them, spread over the bases, and returns how many chats were
// answered. Every refusal must be the budget's.
func spendConcurrently(t *testing.T, key string, bases ...string) int64 {
	var ok atomic.Int64
	var wg sync.WaitGroup
	for g := range 50 {
		wg.Go(func() {
			for i := range 4 {
				status, h, body := budgetChat(t, bases[(g+i)%len(bases)], key, model)
				switch status {
				case http.StatusOK:
					ok.Add(1)
					continue
				case http.StatusTooManyRequests:
					if !strings.Contains(body, `"insufficient_quota"`) || !strings.Contains(body, "budget") || h.Get("X-Should-Retry") != "false" {
						t.Errorf("a refusal: %s (x-should-retry %q), want the budget's insufficient_quota, not to be retried", body, h.Get("X-Should-Retry"))
					}
				default:
					t.Errorf("a chat: %d %s", status, body)
				}
				return
			}
		})
	}
	wg.Wait()
	return ok.Load()
}

// TestBudgetHoldsUnderConcurrency has 50 callers of one key spend a small
// budget at once: what they spend never passes it, since each request
// reserves its highest cost until it is settled; a restart keeps the
// spend; and a model without a price is refused rather than counted free.
func TestBudgetHoldsUnderConcurrency(t *testing.T) {
	e := start(t, manyFailures, testPrices, "tier metered {\n\t\t\tbudget 0.01/day\n\t\t}")
	id, key := e.addKey(t, "metered")
	e.waitKeysKnown(t)

	answered := spendConcurrently(t, key, e.caddy.URL)
	var stored store.UsageRow
	eventually2s(t, "the ledger holds every answered chat", func() bool {
		stored = e.storedToday(t, id)
		return stored.Requests == answered
	})
	t.Logf("50 callers at once: %d chats answered, %d of %d micro-units spent", answered, stored.Cost, budget)
	if stored.Cost > budget || stored.Cost != answered*chatCost {
		t.Errorf("spent %d micro-units in %d chats, want %d each and at most the budget %d", stored.Cost, answered, chatCost, budget)
	}
	if answered < budget/chatCost-2 {
		t.Errorf("only %d chats answered: the budget allows %d", answered, budget/chatCost)
	}
	// GET /v1/usage tells the caller its budget, in its currency.
	var u struct {
		Limits struct {
			Budget *struct {
				Period                 string
				Limit, Used, Remaining struct{ Amount, Currency string }
			}
		}
	}
	res := e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer " + key}})
	if err := json.NewDecoder(res.Body).Decode(&u); err != nil || u.Limits.Budget == nil {
		t.Fatalf("GET /v1/usage: %v, no budget", err)
	}
	if b := u.Limits.Budget; b.Period != "day" || b.Limit.Amount != "0.010000" || b.Limit.Currency != "USD" ||
		b.Used.Amount != policy.FormatCost(stored.Cost) || b.Remaining.Amount != policy.FormatCost(budget-stored.Cost) {
		t.Errorf("the usage's budget: %+v, want 0.010000 USD a day, %d micro-units used", *b, stored.Cost)
	}

	// The spend survives a restart: the ledger seeds the budget again.
	e.caddy.Stop(t)
	e.caddy.Restart(t, vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", "store "+strings.Replace(e.store, ":", " ", 1),
		testPrices, "tier metered {\n\t\t\tbudget 0.01/day\n\t\t}", "tier pro"))
	closeIdle()
	if status, _, body := budgetChat(t, e.caddy.URL, key, model); status != http.StatusTooManyRequests || !strings.Contains(body, "budget") {
		t.Errorf("after a restart: %d %s, want the budget's 429", status, body)
	}
}

func TestUnpricedModelWithABudget(t *testing.T) {
	e := start(t, manyFailures, testPrices, "tier metered {\n\t\t\tbudget 1/day\n\t\t}")
	_, key := e.addKey(t, "metered")
	e.waitKeysKnown(t)
	status, _, body := budgetChat(t, e.caddy.URL, key, "vigthoria-pro-1")
	if status != http.StatusBadRequest || !strings.Contains(body, `"model_not_priced"`) {
		t.Errorf("an unpriced model with a budget: %d %s, want 400 model_not_priced", status, body)
	}
	// A caller without a budget may use it.
	if status, _, body := budgetChat(t, e.caddy.URL, e.key, "vigthoria-pro-1"); status != http.StatusOK {
		t.Errorf("an unpriced model without a budget: %d %s", status, body)
	}

	e.reload(t, manyFailures, testPrices, "unpriced free", "tier metered {\n\t\t\tbudget 1/day\n\t\t}")
	if status, _, body := budgetChat(t, e.caddy.URL, key, "vigthoria-pro-1"); status != http.StatusOK {
		t.Errorf("an unpriced model with unpriced free: %d %s", status, body)
	}
}

// TestFleetBudget spends a budget from two instances on one Redis at
// once: the fleet holds it as one instance does.
func TestFleetBudget(t *testing.T) {
	f := startFleetWith(t, []string{testPrices}, "budget 0.01/day")
	answered := spendConcurrently(t, f.key, f.a.URL, f.b.URL)
	if answered*chatCost > budget || answered < budget/chatCost-2 {
		t.Errorf("two instances answered %d chats of %d micro-units, want as many as fit in %d", answered, chatCost, budget)
	}
}

// TestMintingKeysBudgetBoundsItsUsers: the users of a key's minted
// tokens spend its budget together, each within its own tier.
func TestMintingKeysBudgetBoundsItsUsers(t *testing.T) {
	e := start(t, manyFailures, testPrices, "tier app {\n\t\t\tbudget 0.001/day\n\t\t}", "tier web")
	_, backend := e.addKey(t, "app", "--mint", "web")
	alice := e.mintWhenKnown(t, backend, map[string]any{"user": "alice"})
	bob := e.mint(t, backend, map[string]any{"user": "bob"})
	// 1000 micro-units: two chats of 360, whoever sends them.
	for _, token := range []string{alice.Token, bob.Token} {
		if status, _, body := budgetChat(t, e.caddy.URL, token, model); status != http.StatusOK {
			t.Fatalf("a chat within the key's budget: %d %s", status, body)
		}
	}
	status, h, body := budgetChat(t, e.caddy.URL, alice.Token, model)
	if status != http.StatusTooManyRequests || !strings.Contains(body, "budget of tier app") || !strings.Contains(body, "shared by every user") || h.Get("X-Should-Retry") != "false" {
		t.Errorf("past the key's budget: %d %s, want the key's budget refusal, shared by its users", status, body)
	}
}

// TestKeysOwnBudget: a budget set on a key bounds it where its tier sets
// none, and a raised one applies within a second, without a reload.
func TestKeysOwnBudget(t *testing.T) {
	e := start(t, manyFailures, testPrices, "tier metered")
	id, key := e.addKey(t, "metered", "--budget", "0.001/day")
	e.waitKeysKnown(t)
	for range 2 { // 1000 micro-units: two chats of 360
		if status, _, body := budgetChat(t, e.caddy.URL, key, model); status != http.StatusOK {
			t.Fatalf("a chat within the key's budget: %d %s", status, body)
		}
	}
	if status, h, body := budgetChat(t, e.caddy.URL, key, model); status != http.StatusTooManyRequests || !strings.Contains(body, "budget") || h.Get("X-Should-Retry") != "false" {
		t.Fatalf("past the key's budget: %d %s, want the budget's 429", status, body)
	}
	e.cli(t, "key", "update", id, "--budget", "0.002/day")
	eventually(t, "the raised budget applies", func() bool {
		status, _, _ := budgetChat(t, e.caddy.URL, key, model)
		return status == http.StatusOK
	})
}

// TestFleetMintedUserBudgets: a minted user's request is reserved on its
// own tokens and budget and on its minting key's at once, in one round
// trip to Redis. The first refusal in order answers, and what the other
// sides took for the refused request is given back.
func TestFleetMintedUserBudgets(t *testing.T) {
	f := startFleetWith(t, []string{testPrices}, "tokens 100000/1h", "budget 0.001/day")
	backend := f.addMintingKey(t)
	mint := func(base, user string) string {
		t.Helper()
		var m mintedToken
		eventually(t, "the minting key is known", func() bool {
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/vigthoria/tokens", jsonBody(map[string]any{"user": user}))
			req.Header.Set("Authorization", "Bearer "+backend)
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				return false
			}
			defer res.Body.Close()
			return res.StatusCode == http.StatusCreated && json.NewDecoder(res.Body).Decode(&m) == nil
		})
		return m.Token
	}
	alice, bob := mint(f.a.URL, "alice"), mint(f.b.URL, "bob")
	rc := redis.NewClient(&redis.Options{Addr: f.redis.Addr})
	defer rc.Close()
	day := time.Now().UTC().Format(time.DateOnly)
	// 1000 micro-units each, alice's and the key's: two chats of 360.
	for i, base := range []string{f.a.URL, f.b.URL} {
		if status, _, body := budgetChat(t, base, alice, model); status != http.StatusOK {
			t.Fatalf("a chat within both budgets: %d %s", status, body)
		}
		if i > 0 {
			continue
		}
		// Each chat reserves 540 (its prompt's estimate), and the first
		// one's settle reaches Redis within milliseconds of its answer,
		// not before it: until then the other instance finds 540 held
		// on both budgets, and a second reservation would pass them.
		eventually(t, "the first chat is settled on both budgets", func() bool {
			keys, err := rc.Keys(t.Context(), "vgt:lim:quota:{budget:*}:"+day).Result()
			if err != nil || len(keys) != 2 {
				return false
			}
			for _, k := range keys {
				if spent, err := rc.Get(t.Context(), k).Int64(); err != nil || spent != chatCost {
					return false
				}
			}
			return true
		})
	}
	status, _, body := budgetChat(t, f.a.URL, alice, model)
	if status != http.StatusTooManyRequests || !strings.Contains(body, "budget of tier metered") || strings.Contains(body, "shared by every user") {
		t.Errorf("past her own budget and the key's: %d %s, want her own budget's refusal, which comes first", status, body)
	}
	// Bob's own budget is untouched, the key's is not: the key's refuses,
	// and what bob's own budget and tokens took is given back.
	status, _, body = budgetChat(t, f.b.URL, bob, model)
	if status != http.StatusTooManyRequests || !strings.Contains(body, "shared by every user") {
		t.Errorf("a new user past the key's budget: %d %s, want the key's refusal, shared by its users", status, body)
	}
	u, _ := (&env{caddy: f.b}).usage(t, bob)
	eventually(t, "bob's budget and tokens are given back", func() bool {
		spent, err := rc.Get(t.Context(), "vgt:lim:quota:{budget:"+u.ClientID+"}:"+day).Int64()
		tokens, _ := (&env{caddy: f.b}).usage(t, bob)
		return (err == redis.Nil || err == nil && spent == 0) &&
			tokens.Limits.Tokens != nil && tokens.Limits.Tokens.Remaining >= tokens.Limits.Tokens.Limit-1
	})
}

// TestFleetSlicedBudget spends a budget large enough to be sliced (1 a
// day: slices of 0.01) from two instances at once. Each instance claims
// a slice in Redis and decides the next requests from it, without a
// round trip; the fleet never spends more than the budget, and once the
// slices are given back, Redis' counter holds exactly what was spent.
func TestFleetSlicedBudget(t *testing.T) {
	const (
		prices  = "prices {\n\t\t\tvigthoria-fast-* input 50 output 100\n\t\t}"
		cost    = 4*50 + 16*100 // a small chat of the stand-in
		reserve = 22*50 + 16*100
		limit   = 1_000_000
		slice   = limit / 100
	)
	f := startFleetWith(t, []string{prices}, "budget 1/day")
	rc := redis.NewClient(&redis.Options{Addr: f.redis.Addr})
	defer rc.Close()
	counter := "vgt:lim:quota:{budget:*}:" + time.Now().UTC().Format(time.DateOnly)
	if status, _, body := budgetChat(t, f.a.URL, f.key, model); status != http.StatusOK {
		t.Fatalf("the first chat: %d %s", status, body)
	}
	keys, err := rc.Keys(t.Context(), counter+":sliced").Result()
	if err != nil || len(keys) != 1 {
		t.Fatalf("the budget's slices in Redis: %v %v, want one counter", keys, err)
	}
	if n, _ := rc.Get(t.Context(), keys[0]).Int64(); n != slice {
		t.Errorf("the first chat claimed %d micro-units, want a slice of %d", n, slice)
	}
	// What the slice holds is not what was spent: the other instance's
	// GET /v1/usage reports the one chat.
	eventually(t, "GET /v1/usage reports what was spent, not what the slice holds", func() bool {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, f.b.URL+"/v1/usage", nil)
		req.Header.Set("Authorization", "Bearer "+f.key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		defer res.Body.Close()
		var rep struct {
			Limits struct {
				Budget struct {
					Used struct{ Amount string } `json:"used"`
				} `json:"budget"`
			} `json:"limits"`
		}
		return json.NewDecoder(res.Body).Decode(&rep) == nil && rep.Limits.Budget.Used.Amount == policy.FormatCost(cost)
	})

	answered := atomic.Int64{}
	answered.Add(1)
	var wg sync.WaitGroup
	for g := range 20 {
		wg.Go(func() {
			for i := 0; ; i++ {
				base := []string{f.a.URL, f.b.URL}[(g+i)%2]
				status, h, body := budgetChat(t, base, f.key, model)
				switch status {
				case http.StatusOK:
					answered.Add(1)
					continue
				case http.StatusTooManyRequests:
					if !strings.Contains(body, "budget") || h.Get("X-Should-Retry") != "false" {
						t.Errorf("a refusal: %s, want the budget's", body)
					}
				default:
					t.Errorf("a chat: %d %s", status, body)
				}
				return
			}
		})
	}
	wg.Wait()
	spent := answered.Load() * cost
	t.Logf("%d chats answered: %d of %d micro-units spent", answered.Load(), spent, limit)
	if spent > limit {
		t.Errorf("two instances spent %d micro-units of a budget of %d", spent, limit)
	}
	// Refused early by at most what the slices held unused (a slice and a
	// half an instance) and what the callers in flight had reserved.
	if low := int64(limit - 2*slice*3/2 - 20*reserve); spent < low {
		t.Errorf("two instances spent %d micro-units of %d when the budget refused, want at least %d", spent, limit, low)
	}
	eventually(t, "the slices are given back: Redis' counter holds what was spent", func() bool {
		keys, err := rc.Keys(t.Context(), counter+"*").Result()
		if err != nil || len(keys) != 1 {
			return false
		}
		n, err := rc.Get(t.Context(), keys[0]).Int64()
		return err == nil && n == spent
	})
}

// TestFleetQuotasThroughStalls attacks a sliced budget, a sliced token
// quota, and a quota that Redis decides on every request (its tier has
// a concurrency limit), as a fleet's callers and a failing store would: 16
// callers of the official client, a quarter on its default path (no
// max_tokens), the others with a cap, some of them streaming, its own
// retries on, every fourth request hung up within a few milliseconds,
// while redis-server stops again and again for longer than the
// instances' probe gives it, as two instances spend the limit. Then:
//
//   - the fleet never spent more than the limit: what the upstream billed;
//   - every failure was one a caller may see: the limit's refusal, the
//     store's 503, its own hang-up;
//   - Redis' counter holds exactly what the ledger charged: no
//     reservation, claim, settle or refund lost or counted twice, though
//     their answers were lost in the stalls;
//   - the ledger charged at least what the upstream billed; more only for
//     calls cut as their caller left, whose bill the proxy cannot know
//     and charges at its bound.
func TestFleetQuotasThroughStalls(t *testing.T) {
	const input, output = 50, 100
	for _, tc := range []struct {
		name   string
		lines  []string
		limits []string
		n      int64                                // the limit, in its units
		billed func(prompt, completion int64) int64 // what the upstream billed, in them
		ledger func(today usageCounts) int64        // what the ledger charged, in them
	}{
		{"budget", []string{"prices {\n\t\t\tvigthoria-fast-* input 50 output 100\n\t\t}", "default_max_tokens 64"}, []string{"budget 5/day"}, 5_000_000,
			func(prompt, completion int64) int64 { return prompt*input + completion*output },
			func(today usageCounts) int64 { return amountMicros(t, today.Cost.Amount) }},
		{"quota", []string{"default_max_tokens 4096"}, []string{"quota 1000000/day"}, 1_000_000,
			func(prompt, completion int64) int64 { return prompt + completion },
			func(today usageCounts) int64 { return today.TotalTokens }},
		{"unsliced quota", []string{"default_max_tokens 1024"}, []string{"quota 100000/day", "concurrent 1000"}, 100_000,
			func(prompt, completion int64) int64 { return prompt + completion },
			func(today usageCounts) int64 { return today.TotalTokens }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startFleetWith(t, tc.lines, append([]string{"store_timeout 100ms"}, tc.limits...)...)
			stats := spendThroughStalls(t, f)
			prompt, completion := f.upstream.Billed()
			billed := tc.billed(prompt, completion)
			t.Logf("%s; the upstream billed %d of %d", stats, billed, tc.n)
			if billed > tc.n {
				t.Errorf("the fleet spent %d of a limit of %d", billed, tc.n)
			}
			rc := redis.NewClient(&redis.Options{Addr: f.redis.Addr})
			defer rc.Close()
			pattern := "vgt:lim:quota:{*}:" + time.Now().UTC().Format(time.DateOnly) + "*"
			var counted, charged int64
			waitFor(t, 10*time.Second, "Redis' counter holds what the ledger charged, the slices given back", func() bool {
				keys, err := rc.Keys(t.Context(), pattern).Result()
				if err != nil || len(keys) != 1 {
					return false // the slices' counter is there until they are back
				}
				if counted, err = rc.Get(t.Context(), keys[0]).Int64(); err != nil {
					return false
				}
				charged = tc.ledger(usageAt(t, f.a.URL, f.key).Today)
				return counted == charged
			})
			// A cut call's bound may pass its reservation (each byte of
			// its body a prompt token), so the charges may pass the limit
			// by a little; what the upstream billed may not.
			t.Logf("the ledger charged %d, Redis counted %d", charged, counted)
			if charged < billed {
				t.Errorf("the ledger charged %d, the upstream billed %d: callers paid less", charged, billed)
			}
		})
	}
}

// spendThroughStalls has 16 callers of the official client spend their
// limit on fleet f, a quarter with no cap, the others with a cap of 16 and
// a third of those streaming, every
// fourth request hung up within a few milliseconds, while redis-server
// stops for 1.5 s every 150 ms: past store_timeout and the probe's second,
// so that the instances hold Redis for down, and answers of calls in
// flight are lost. It returns what happened, for the log.
func spendThroughStalls(t *testing.T, f *fleet) string {
	var answered, unavailable, hungUp atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 16 {
		client := openai.NewClient(option.WithBaseURL([]string{f.a.URL, f.b.URL}[g%2]+"/v1/"), option.WithAPIKey(f.key))
		wg.Go(func() {
			for i := 0; ; i++ {
				params := chatParams("spend")
				if g%4 != 0 {
					params.MaxTokens = openai.Int(16)
				}
				ctx, cancel := t.Context(), context.CancelFunc(func() {})
				if i%4 == 3 {
					ctx, cancel = context.WithTimeout(ctx, time.Duration(i%5)*time.Millisecond)
				}
				var err error
				if g%4 == 1 {
					stream := client.Chat.Completions.NewStreaming(ctx, params)
					for stream.Next() {
					}
					err = stream.Err()
					stream.Close()
				} else {
					_, err = client.Chat.Completions.New(ctx, params)
				}
				left := ctx.Err() != nil
				cancel()
				var oe *openai.Error
				switch {
				case err == nil:
					answered.Add(1)
				case left:
					hungUp.Add(1)
				case errors.As(err, &oe) && oe.StatusCode == http.StatusServiceUnavailable && oe.Code == "proxy_unavailable":
					unavailable.Add(1)
				case errors.As(err, &oe) && oe.StatusCode == http.StatusTooManyRequests && oe.Code == "insufficient_quota":
					return // the limit is spent for what this caller asks
				default:
					t.Errorf("caller %d, request %d: %v", g, i, err)
					return
				}
			}
		})
	}
	go func() { wg.Wait(); close(done) }()
	stalls := 0
	for stopped := false; !stopped; {
		select {
		case <-done:
			stopped = true
		case <-time.After(150 * time.Millisecond):
			f.redis.Pause(t)
			time.Sleep(1500 * time.Millisecond)
			f.redis.Resume(t)
			stalls++
		}
	}
	if stalls < 3 || answered.Load() < 100 {
		t.Errorf("%d stalls, %d answered: the test did not spend through stalls", stalls, answered.Load())
	}
	return fmt.Sprintf("%d stalls; %d answered, %d refused 503 while Redis was down, %d hung up",
		stalls, answered.Load(), unavailable.Load(), hungUp.Load())
}

// amountMicros reads an amount of GET /v1/usage as micro-units (micros
// writes one).
func amountMicros(t *testing.T, amount string) int64 {
	t.Helper()
	n, err := policy.ParseMoney(amount, math.MaxInt64)
	if err != nil {
		t.Fatalf("amount %q: %v", amount, err)
	}
	return n
}
