package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// tierBlock is a tier "pro" with the given limit lines; start's own "tier
// pro" line is replaced by reload, so tests use it with startTier.
func startTier(t *testing.T, limits ...string) *env {
	t.Helper()
	return start(t, manyFailures, "tier metered {\n\t\t\t"+strings.Join(limits, "\n\t\t\t")+"\n\t\t}")
}

// meteredKey adds a key of tier "metered" to the env's store and waits
// until the proxy accepts it.
func (e *env) meteredKey(t *testing.T) (string, openai.Client) {
	t.Helper()
	_, secret := e.addKey(t, "metered")
	e.waitKeysKnown(t)
	return secret, newClient(e.caddy.URL, secret)
}

// waitKeysKnown waits until the proxy knows every key added to its store
// so far. Any request a key makes counts against its limits, so it asks
// with a key of its own, added last, of the unlimited tier "pro": the
// proxy loads the keys added before it in the same pass.
func (e *env) waitKeysKnown(t *testing.T) {
	t.Helper()
	_, probe := e.addKey(t, "pro")
	eventually(t, "the proxy knows the new keys", func() bool {
		res := e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer " + probe}})
		return res.StatusCode == http.StatusOK
	})
}

type usageAnswer struct {
	Object   string      `json:"object"`
	ClientID string      `json:"client_id"`
	Tier     string      `json:"tier"`
	MintedBy string      `json:"minted_by"`
	Today    usageCounts `json:"today"`
	Month    usageCounts `json:"month"`
	Limits   struct {
		Requests *struct {
			Limit, Remaining int64
			Reset            string
		} `json:"requests"`
		Tokens *struct {
			Limit, Remaining int64
			Reset            string
		} `json:"tokens"`
		Concurrent *struct {
			Limit    int `json:"limit"`
			InFlight int `json:"in_flight"`
		} `json:"concurrent"`
		Quota *struct {
			Limit, Used, Remaining int64
		} `json:"quota"`
	} `json:"limits"`
	ByModel []struct {
		Model string `json:"model"`
		usageCounts
	} `json:"by_model"`
}

type usageCounts struct {
	Requests         int64 `json:"requests"`
	PromptTokens     int64 `json:"prompt_tokens"`
	CompletionTokens int64 `json:"completion_tokens"`
	TotalTokens      int64 `json:"total_tokens"`
	PromptDetails    *struct {
		CachedTokens int64 `json:"cached_tokens"`
	} `json:"prompt_tokens_details"`
	CompletionDetails *struct {
		ReasoningTokens int64 `json:"reasoning_tokens"`
	} `json:"completion_tokens_details"`
	Cost *struct {
		Amount   string `json:"amount"`
		Currency string `json:"currency"`
	} `json:"cost"`
}

func (e *env) usage(t *testing.T, key string) (usageAnswer, http.Header) {
	t.Helper()
	u, h, err := e.tryUsage(t, key)
	if err != nil {
		t.Fatal(err)
	}
	return u, h
}

// usageAt is usage for key at the proxy at base, one of a fleet's.
func usageAt(t *testing.T, base, key string) usageAnswer {
	t.Helper()
	return readUsage(t, base, func(req *http.Request) { req.Header.Set("Authorization", "Bearer "+key) })
}

// readUsage reads GET /v1/usage at the proxy at base, its request's
// credentials set by auth.
func readUsage(t *testing.T, base string, auth func(*http.Request)) usageAnswer {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, base+"/v1/usage", nil)
	auth(req)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var u usageAnswer
	if err := json.NewDecoder(res.Body).Decode(&u); err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/usage: %d %v", res.StatusCode, err)
	}
	return u
}

// tryUsage is usage for a caller that may be refused for a while, such
// as while the instance finds Redis again.
func (e *env) tryUsage(t *testing.T, key string) (usageAnswer, http.Header, error) {
	t.Helper()
	res := e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer " + key}})
	var u usageAnswer
	if err := json.NewDecoder(res.Body).Decode(&u); err != nil || res.StatusCode != http.StatusOK {
		return u, res.Header, fmt.Errorf("GET /v1/usage: %d %v", res.StatusCode, err)
	}
	return u, res.Header, nil
}

func TestRequestLimitRefusesWith429AndHonestHeaders(t *testing.T) {
	e := startTier(t, "requests 3/1m burst 3")
	key, client := e.meteredKey(t)
	e.upstream.Reset()
	var last *http.Response
	for i := range 3 {
		var raw *http.Response
		if _, err := client.Chat.Completions.New(t.Context(), chatParams("hi"), option.WithResponseInto(&raw)); err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		if got := raw.Header.Get("X-Ratelimit-Remaining-Requests"); got != strconv.Itoa(2-i) {
			t.Errorf("request %d: x-ratelimit-remaining-requests = %q, want %d", i+1, got, 2-i)
		}
		if raw.Header.Get("X-Ratelimit-Limit-Requests") != "3" || raw.Header.Get("Ratelimit-Policy") != `"requests";q=3;w=60` {
			t.Errorf("request %d: limit %q policy %q", i+1, raw.Header.Get("X-Ratelimit-Limit-Requests"), raw.Header.Get("Ratelimit-Policy"))
		}
		last = raw
	}
	if last.Header.Get("X-Ratelimit-Limit") == "" {
		t.Error("the upstream's X-RateLimit-Limit did not pass")
	}
	_, err := client.Chat.Completions.New(t.Context(), chatParams("hi"), option.WithResponseInto(&last))
	wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded")
	retry, _ := strconv.Atoi(last.Header.Get("Retry-After"))
	if retry < 19 || retry > 20 {
		t.Errorf("Retry-After = %q, want the 20s a request takes to refill", last.Header.Get("Retry-After"))
	}
	reset, _ := strconv.ParseInt(last.Header.Get("X-Ratelimit-Reset"), 10, 64)
	if last.Header.Get("X-Ratelimit-Limit") != "3" || last.Header.Get("X-Ratelimit-Remaining") != "0" || reset < time.Now().Unix()+18 {
		t.Errorf("429 headers: limit %q remaining %q reset %q, want 3, 0 and about 20s from now",
			last.Header.Get("X-Ratelimit-Limit"), last.Header.Get("X-Ratelimit-Remaining"), last.Header.Get("X-Ratelimit-Reset"))
	}
	e.wantUpstreamCalls(t, 3)

	// A caller out of requests still reads its standing (GET /v1/usage
	// counts in a request bucket of its own), and the operator from the
	// ledger.
	res := e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer " + key}})
	if res.StatusCode != http.StatusOK || res.Header.Get("X-Ratelimit-Remaining-Requests") != "0" {
		t.Errorf("usage: %d, x-ratelimit-remaining-requests = %q, want 200 and 0", res.StatusCode, res.Header.Get("X-Ratelimit-Remaining-Requests"))
	}
	row := regexp.MustCompile(`(?m)^key_\w+\s+\S+\s+vigthoria-fast-1\s+3\s`)
	deadline := time.Now().Add(3 * time.Second) // the ledger is written once a second
	for out := e.cli(t, "usage"); !row.MatchString(out); out = e.cli(t, "usage") {
		if time.Now().After(deadline) {
			t.Fatalf("the ledger does not hold the 3 requests:\n%s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestTokensReservedThenSettled(t *testing.T) {
	// A window so long that refill is below a token during the test.
	e := startTier(t, "tokens 100000/10000h")
	key, client := e.meteredKey(t)
	params := chatParams("count my tokens please")
	params.MaxTokens = openai.Int(7)
	var raw *http.Response
	res, err := client.Chat.Completions.New(t.Context(), params, option.WithResponseInto(&raw))
	if err != nil {
		t.Fatal(err)
	}
	// The answer's headers show the reservation (estimate) taken...
	reserved := 100000 - atoi(t, raw.Header.Get("X-Ratelimit-Remaining-Tokens"))
	if reserved < 7 {
		t.Errorf("reserved %d tokens, want at least max_tokens", reserved)
	}
	// ...and settlement replaced it with what the upstream reported, as
	// the response ended: a moment after the client had the whole answer.
	used := res.Usage.TotalTokens
	eventually(t, "the answer is settled", func() bool {
		u, _ := e.usage(t, key)
		return u.Today.TotalTokens == used
	})
	u, h := e.usage(t, key)
	if u.Limits.Tokens.Remaining != 100000-used || u.Today.TotalTokens != used || u.Today.CompletionTokens != 7 {
		t.Errorf("after settling: remaining %d, today %+v; want %d remaining and %d used", u.Limits.Tokens.Remaining, u.Today, 100000-used, used)
	}
	if h.Get("X-Ratelimit-Remaining-Tokens") != strconv.FormatInt(100000-used, 10) {
		t.Errorf("usage headers say %s remaining, the body %d", h.Get("X-Ratelimit-Remaining-Tokens"), u.Limits.Tokens.Remaining)
	}

	t.Run("an upstream error refunds", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{FailStatus: 500, FailCount: 1})
		_, err := client.Chat.Completions.New(t.Context(), params)
		wantOpenAIError(t, err, 500, "upstream_error")
		if u2, _ := e.usage(t, key); u2.Limits.Tokens.Remaining != 100000-used {
			t.Errorf("after an upstream 500: %d remaining, want the %d before", u2.Limits.Tokens.Remaining, 100000-used)
		}
	})
}

func TestStreamUsageIsTappedAndStripped(t *testing.T) {
	e := startTier(t, "tokens 100000/10000h")
	key, client := e.meteredKey(t)
	params := chatParams("stream it")
	params.MaxTokens = openai.Int(5)

	t.Run("client did not ask for usage", func(t *testing.T) {
		stream := client.Chat.Completions.NewStreaming(t.Context(), params)
		n := 0
		for stream.Next() {
			n++
			if c := stream.Current(); len(c.Choices) == 0 || c.Usage.TotalTokens != 0 {
				t.Errorf("chunk %d carries usage or no choices: the proxy's usage chunk leaked", n)
			}
		}
		if err := stream.Err(); err != nil {
			t.Fatal(err)
		}
		if n != 7 {
			t.Errorf("got %d chunks, want 7", n)
		}
		var sent struct {
			StreamOptions struct {
				IncludeUsage bool `json:"include_usage"`
			} `json:"stream_options"`
		}
		json.Unmarshal(e.lastRequest(t).Body, &sent)
		if !sent.StreamOptions.IncludeUsage {
			t.Error("the proxy did not ask the upstream for the stream's usage")
		}
		// The client has all it asked for at [DONE]; the proxy settles as
		// the response ends, a moment later.
		eventually(t, "the stream is charged the upstream's usage", func() bool {
			u, _ := e.usage(t, key)
			return u.Today.CompletionTokens == 5 && u.Today.PromptTokens > 0
		})
	})
	t.Run("client asked for usage", func(t *testing.T) {
		p := params
		p.StreamOptions.IncludeUsage = openai.Bool(true)
		stream := client.Chat.Completions.NewStreaming(t.Context(), p)
		var total int64
		for stream.Next() {
			if u := stream.Current().Usage; u.TotalTokens > 0 {
				total = u.TotalTokens
			}
		}
		if err := stream.Err(); err != nil || total == 0 {
			t.Errorf("the client's usage chunk is missing (err %v)", err)
		}
	})
}

func TestCutShortStreamIsChargedForWhatWasStreamed(t *testing.T) {
	e := startTier(t, "tokens 100000/10000h")
	key, client := e.meteredKey(t)
	e.upstream.SetBehavior(standin.Behavior{FailMidStream: 3})
	params := chatParams("stream it")
	params.MaxTokens = openai.Int(10)
	stream := client.Chat.Completions.NewStreaming(t.Context(), params)
	for stream.Next() {
	}
	if stream.Err() == nil {
		t.Fatal("the broken stream ended without error")
	}
	eventually(t, "the broken stream is settled", func() bool {
		u, _ := e.usage(t, key)
		return u.Today.Requests == 1
	})
	u, _ := e.usage(t, key)
	if u.Today.CompletionTokens != 3 || u.Today.PromptTokens == 0 {
		t.Errorf("charged %+v, want the 3 streamed tokens and the prompt", u.Today)
	}
	if u.Limits.Tokens.Remaining != 100000-u.Today.TotalTokens {
		t.Errorf("the limiter has %d remaining, the ledger %d used: they disagree", u.Limits.Tokens.Remaining, u.Today.TotalTokens)
	}
}

func TestConcurrencySlotsAreReleased(t *testing.T) {
	e := startTier(t, "concurrent 1")
	key, client := e.meteredKey(t)
	e.upstream.SetBehavior(standin.Behavior{ChunkDelay: 200 * time.Millisecond})

	ctx, cancel := context.WithCancel(t.Context())
	stream := client.Chat.Completions.NewStreaming(ctx, chatParams("slow"))
	if !stream.Next() {
		t.Fatalf("no first chunk: %v", stream.Err())
	}
	// While the stream runs, the one slot is taken.
	_, err := client.Chat.Completions.New(t.Context(), chatParams("second"))
	wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded")
	cancel() // the client goes away mid-stream
	stream.Close()
	// Its call goes on to its end, holding the slot until then (see
	// TestLeavingEarlyNeverCostsLess).
	waitFor(t, 5*time.Second, "the upstream ends its answer", func() bool { return e.upstream.Active() == 0 })
	eventually(t, "the slot is free after the upstream's answer ended", func() bool {
		u, _ := e.usage(t, key)
		return u.Limits.Concurrent.InFlight == 0
	})
	e.upstream.SetBehavior(standin.Behavior{})
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("third")); err != nil {
		t.Errorf("after release: %v", err)
	}

	t.Run("parallel requests over the limit", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{Latency: 300 * time.Millisecond})
		var wg sync.WaitGroup
		codes := make([]int, 4)
		for i := range codes {
			wg.Go(func() {
				_, err := client.Chat.Completions.New(t.Context(), chatParams("p"))
				if oe, ok := err.(*openai.Error); ok {
					codes[i] = oe.StatusCode
				} else if err == nil {
					codes[i] = 200
				}
			})
		}
		wg.Wait()
		ok := 0
		for _, c := range codes {
			if c == 200 {
				ok++
			}
		}
		if ok < 1 || ok > 3 || !contains(codes, 429) {
			t.Errorf("statuses %v: want some 200 and the overlapping ones 429", codes)
		}
		if u, _ := e.usage(t, key); u.Limits.Concurrent.InFlight != 0 {
			t.Errorf("%d slots still taken", u.Limits.Concurrent.InFlight)
		}
	})
}

func TestQuotaSurvivesRestartAndSaysDoNotRetry(t *testing.T) {
	e := startTier(t, "quota 60/day")
	key, client := e.meteredKey(t)
	params := chatParams("quota")
	params.MaxTokens = openai.Int(10)
	var used int64
	for used < 40 {
		res, err := client.Chat.Completions.New(t.Context(), params)
		if err != nil {
			t.Fatalf("after %d tokens: %v", used, err)
		}
		used += res.Usage.TotalTokens
	}
	// A restart: Caddy stops (the ledger is flushed) and starts again.
	storeLine := "store " + strings.Replace(e.store, ":", " ", 1)
	e.caddy.Stop(t)
	e.caddy.Restart(t, vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", storeLine, "tier metered {\n\t\t\tquota 60/day\n\t\t}"))
	closeIdle()
	u, _ := e.usage(t, key)
	if u.Limits.Quota == nil || u.Limits.Quota.Used != used {
		t.Fatalf("after restart quota = %+v, want %d used", u.Limits.Quota, used)
	}
	var raw *http.Response
	for range 10 {
		if _, err := client.Chat.Completions.New(t.Context(), params, option.WithResponseInto(&raw)); err != nil {
			wantOpenAIError(t, err, http.StatusTooManyRequests, "insufficient_quota")
			if raw.Header.Get("X-Should-Retry") != "false" || raw.Header.Get("Retry-After") == "" {
				t.Errorf("quota 429 headers: x-should-retry %q retry-after %q", raw.Header.Get("X-Should-Retry"), raw.Header.Get("Retry-After"))
			}
			return
		}
	}
	t.Fatal("the quota never ran out")
}

func TestReloadKeepsLimiterState(t *testing.T) {
	e := startTier(t, "requests 3/1h")
	_, client := e.meteredKey(t)
	for range 2 {
		if _, err := client.Chat.Completions.New(t.Context(), chatParams("a")); err != nil {
			t.Fatal(err)
		}
	}
	e.reload(t, manyFailures, "tier metered {\n\t\t\trequests 3/1h\n\t\t}", "max_body 5MB")
	// A connection the old server accepted may close under the first
	// request after a reload; such a request never reached the handler,
	// so retrying it is safe and counts nothing twice.
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("b"), option.WithMaxRetries(2)); err != nil {
		t.Fatalf("third request after reload: %v", err)
	}
	_, err := client.Chat.Completions.New(t.Context(), chatParams("c"))
	wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded")
}

// TestUsageWhileTheLedgerWaitsForTheStore: a request's usage shows in
// GET /v1/usage, once, while the batch that holds it waits for the
// store: here SQLite, whose write lock another connection holds, as a
// backup or the CLI may hold it for a moment. The ledger's flush (each
// second) has taken the batch from its pending rows and waits for the
// lock; the figure a quota would be loaded from missed it.
func TestUsageWhileTheLedgerWaitsForTheStore(t *testing.T) {
	e := startTier(t, "requests 100/1m")
	key, client := e.meteredKey(t)
	res, err := client.Chat.Completions.New(t.Context(), chatParams("counted once"))
	if err != nil {
		t.Fatal(err)
	}
	want := usageCounts{Requests: 1, PromptTokens: res.Usage.PromptTokens, CompletionTokens: res.Usage.CompletionTokens, TotalTokens: res.Usage.TotalTokens}
	counted := func(when string) {
		t.Helper()
		u, _ := e.usage(t, key)
		got := u.Today
		got.PromptDetails, got.CompletionDetails = nil, nil
		if got != want {
			t.Errorf("%s: today %+v, want %+v", when, got, want)
		}
	}

	st, err := sqlite.Open(strings.TrimPrefix(e.store, "sqlite:"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	conn, err := st.DB().Conn(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(t.Context(), "BEGIN IMMEDIATE"); err != nil {
		t.Fatal(err)
	}
	// Past the next flush, within the store's busy timeout (5 s): the
	// batch is on its way. (Sooner, it is still pending: counted too.)
	time.Sleep(2 * time.Second)
	counted("while the store's write lock is held")
	if _, err := conn.ExecContext(t.Context(), "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	counted("once written")
}

// TestUsageCountsWhatIsNoLongerInFlight: a usage report that shows none
// of the caller's requests in flight counts every request it admitted,
// whenever it is read, as a caller polling it for a request's end reads
// it. Each request is in the ledger before its slot is let go (settle),
// so the report reads the limits' state first: read after the ledger, it
// could count a request that ended between its two reads as neither
// running nor counted. The caller has a long history this month, so
// that reading its rows takes a while. The upstream answers 500, which
// charges no tokens: only the request counts tell.
func TestUsageCountsWhatIsNoLongerInFlight(t *testing.T) {
	const capacity = 100000
	e := startTier(t, "requests "+strconv.Itoa(capacity)+"/10000h", "concurrent 1")
	key, _ := e.meteredKey(t)
	auth := http.Header{"Authorization": {"Bearer " + key}}
	u, _ := e.usage(t, key)
	polls := int64(1) // a read of usage is a request of the caller's too
	st, err := sqlite.Open(strings.TrimPrefix(e.store, "sqlite:"))
	if err != nil {
		t.Fatal(err)
	}
	// Rows of no use, of models of the past, written as another
	// instance's ledger would: each is read, and counts for nothing.
	history := store.UsageBatch{Writer: "history", Seq: 1}
	for i := range 3000 {
		history.Rows = append(history.Rows, store.UsageRow{Client: u.ClientID, Day: store.Day(time.Now()), Model: fmt.Sprintf("retired-model-%d", i)})
	}
	err = st.AddUsage(t.Context(), history)
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusInternalServerError})

	stop := make(chan struct{})
	var sending sync.WaitGroup
	sending.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if e.status(t, http.MethodPost, "/v1/chat/completions", `{"model":"vigthoria-fast-1","messages":[]}`, auth) == 0 {
				return
			}
		}
	})
	var checked int64
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline) && !t.Failed(); {
		u, _ := e.usage(t, key)
		polls++
		if u.Limits.Concurrent.InFlight != 0 {
			continue
		}
		checked++
		if admitted := capacity - u.Limits.Requests.Remaining - polls; u.Today.Requests < admitted {
			t.Errorf("with nothing in flight, the report counts %d requests of the %d admitted", u.Today.Requests, admitted)
		}
	}
	close(stop)
	sending.Wait()
	if checked == 0 {
		t.Fatal("no report showed nothing in flight")
	}
	t.Logf("%d reports of %d checked", checked, polls)
}

func TestUsageIsTheCallersOwn(t *testing.T) {
	e := startTier(t, "requests 100/1m")
	key, client := e.meteredKey(t)
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("mine")); err != nil {
		t.Fatal(err)
	}
	// Another caller's traffic does not show.
	if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("theirs")); err != nil {
		t.Fatal(err)
	}
	e.upstream.Reset()
	eventually(t, "the request is settled", func() bool {
		u, _ := e.usage(t, key)
		return u.Today.Requests == 1
	})
	u, _ := e.usage(t, key)
	if u.Object != "usage" || u.Tier != "metered" || !strings.HasPrefix(u.ClientID, "key_") || u.Today.Requests != 1 {
		t.Errorf("usage = %+v, want this key's one request", u)
	}
	if len(u.ByModel) != 1 || u.ByModel[0].Model != model {
		t.Errorf("by_model = %+v, want %s", u.ByModel, model)
	}
	e.wantUpstreamCalls(t, 0) // answered by the proxy, not the upstream's organisation figures
	raw := e.do(t, http.MethodGet, "/v1/usage", nil, http.Header{"Authorization": {"Bearer " + key}})
	body, _ := io.ReadAll(raw.Body)
	if strings.Contains(string(body), standin.Organization) {
		t.Error("the upstream's organisation usage reached a client")
	}
}

func TestTierPolicy(t *testing.T) {
	e := startTier(t, "models vigthoria-fast-*", "max_tokens 50")
	key, client := e.meteredKey(t)
	e.upstream.Reset()

	t.Run("model outside the tier", func(t *testing.T) {
		p := chatParams("hi")
		p.Model = "vigthoria-pro-1"
		_, err := client.Chat.Completions.New(t.Context(), p)
		oe := wantOpenAIError(t, err, http.StatusForbidden, "model_not_allowed")
		if !strings.Contains(oe.Message, "vigthoria-pro-1") {
			t.Errorf("message %q does not name the model", oe.Message)
		}
	})
	t.Run("max_tokens over the cap", func(t *testing.T) {
		p := chatParams("hi")
		p.MaxTokens = openai.Int(51)
		_, err := client.Chat.Completions.New(t.Context(), p)
		oe := wantOpenAIError(t, err, http.StatusBadRequest, "max_tokens_too_large")
		if !strings.Contains(oe.Message, "50") {
			t.Errorf("message %q does not name the cap", oe.Message)
		}
	})
	t.Run("not JSON", func(t *testing.T) {
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader("model=x"), nil)
		wantAPIError(t, res, http.StatusBadRequest, "invalid_request")
	})
	// Bodies that would show the policy one thing and the upstream another.
	for _, tc := range []struct{ name, body, code string }{
		{"another case of model", `{"model":"vigthoria-pro-1","Model":"vigthoria-fast-1","messages":[]}`, "invalid_request"},
		{"escaped model key", `{"mod\u0065l":"vigthoria-pro-1","messages":[]}`, "model_not_allowed"},
		{"model twice", `{"model":"vigthoria-fast-1","model":"vigthoria-pro-1","messages":[]}`, "invalid_request"},
		{"max_completion_tokens over the cap", `{"model":"vigthoria-fast-1","max_tokens":5,"max_completion_tokens":5000,"messages":[]}`, "max_tokens_too_large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(tc.body),
				http.Header{"Authorization": {"Bearer " + key}})
			status := map[string]int{"model_not_allowed": 403, "invalid_request": 400, "max_tokens_too_large": 400}[tc.code]
			wantAPIError(t, res, status, tc.code)
		})
	}
	e.wantUpstreamCalls(t, 0)

	t.Run("absent max_tokens is set to the cap", func(t *testing.T) {
		res, err := client.Chat.Completions.New(t.Context(), chatParams("hi"))
		if err != nil {
			t.Fatal(err)
		}
		var sent struct {
			MaxCompletionTokens int `json:"max_completion_tokens"`
		}
		json.Unmarshal(e.lastRequest(t).Body, &sent)
		if sent.MaxCompletionTokens != 50 {
			t.Errorf("upstream got max_completion_tokens %d, want the cap 50", sent.MaxCompletionTokens)
		}
		_ = res
	})
}

func atoi(t *testing.T, s string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("%q is not a number", s)
	}
	return n
}

func contains(xs []int, x int) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}
