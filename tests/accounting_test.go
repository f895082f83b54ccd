package tests

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
	"github.com/vigthoria/caddy-vigthoria/store"
	"github.com/vigthoria/caddy-vigthoria/store/sqlite"
)

// storedToday returns the client's usage of today as the env's SQLite
// store holds it, all models together.
func (e *env) storedToday(t *testing.T, clientID string) store.UsageRow {
	t.Helper()
	st, err := sqlite.Open(strings.TrimPrefix(e.store, "sqlite:"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rows, err := st.UsageSince(t.Context(), clientID, store.Day(time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	var sum store.UsageRow
	for _, r := range rows {
		sum.Add(r)
	}
	return sum
}

// wantStored waits until the store holds what GET /v1/usage said of today.
func (e *env) wantStored(t *testing.T, u usageAnswer) store.UsageRow {
	t.Helper()
	var got store.UsageRow
	eventually2s(t, "the ledger is stored", func() bool {
		got = e.storedToday(t, u.ClientID)
		return got.Requests == u.Today.Requests && got.PromptTokens == u.Today.PromptTokens &&
			got.CompletionTokens == u.Today.CompletionTokens
	})
	return got
}

// TestUsageDetailsReachTheLedger: the cached and reasoning tokens of an
// upstream's usage, sent by OpenAI-compatible servers in details objects,
// are kept per client, model and day, answered by GET /v1/usage and
// stored; a usage object with a details object amid its counts is charged
// in full.
func TestUsageDetailsReachTheLedger(t *testing.T) {
	e, key := startFaults(t, time.Minute)
	client := newClient(e.caddy.URL, key)

	e.upstream.SetBehavior(standin.Behavior{CachedTokens: 3})
	res, err := client.Chat.Completions.New(t.Context(), chatParams("what is cached here"))
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Usage.PromptTokensDetails.CachedTokens; got != 3 {
		t.Errorf("the client read %d cached tokens, want the upstream's 3", got)
	}
	waitSettled(t, e, key)

	e.upstream.SetBehavior(standin.Behavior{Deltas: standin.ReasoningDeltas})
	params := chatParams("think it over")
	params.MaxTokens = openai.Int(5)
	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	stream := client.Chat.Completions.NewStreaming(t.Context(), params)
	var reasoning int64
	for stream.Next() {
		if u := stream.Current().Usage; u.TotalTokens > 0 {
			reasoning = u.CompletionTokensDetails.ReasoningTokens
		}
	}
	if err := stream.Err(); err != nil || reasoning != 5 {
		t.Fatalf("the stream reported %d reasoning tokens (%v), want 5", reasoning, err)
	}
	u := waitSettled(t, e, key)
	if d := u.Today.PromptDetails; d == nil || d.CachedTokens != 3 {
		t.Errorf("today's prompt_tokens_details %+v, want 3 cached tokens", d)
	}
	if d := u.Today.CompletionDetails; d == nil || d.ReasoningTokens != 5 {
		t.Errorf("today's completion_tokens_details %+v, want 5 reasoning tokens", d)
	}
	if len(u.ByModel) != 1 || u.ByModel[0].PromptDetails == nil || u.ByModel[0].PromptDetails.CachedTokens != 3 ||
		u.ByModel[0].CompletionDetails == nil || u.ByModel[0].CompletionDetails.ReasoningTokens != 5 {
		t.Errorf("by model %+v, want %s's 3 cached and 5 reasoning tokens", u.ByModel, model)
	}

	// The figures of the issue: 10 + 500, not the 32 of a reader that
	// stopped at the first '}'. The request allows the 500 (see
	// TestUsagePastTheCapIsBounded for more than it allows).
	before := u
	e.upstream.SetBehavior(standin.Behavior{Usage: `{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens":500}`})
	chat := `{"model":"vigthoria-fast-1","max_tokens":500,"messages":[{"role":"user","content":"hi"}]}`
	if res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(chat), http.Header{"Authorization": {"Bearer " + key}}); res.StatusCode != http.StatusOK {
		t.Fatalf("status %d", res.StatusCode)
	}
	u = waitSettled(t, e, key)
	if charged := u.Today.TotalTokens - before.Today.TotalTokens; charged != 510 {
		t.Errorf("charged %d tokens for the nested usage, want 510", charged)
	}

	stored := e.wantStored(t, u)
	if stored.CachedTokens != 3 || stored.ReasoningTokens != 5 {
		t.Errorf("stored %+v, want 3 cached and 5 reasoning tokens", stored)
	}
}

// TestAbsurdUsageIsChargedTheReservation: usage that is no count
// (negative, fractional, a string, past int64) or more than any request
// can use is charged as the request's reservation; the caller's figures
// stay positive and sane, and the usage after it is stored.
func TestAbsurdUsageIsChargedTheReservation(t *testing.T) {
	e, key := startFaults(t, time.Minute)
	for _, usage := range []string{
		`{"prompt_tokens":9e18,"completion_tokens":5,"total_tokens":9e18}`,
		`{"prompt_tokens":9000000000000000000,"completion_tokens":5}`,
		`{"prompt_tokens":9e18,"completion_tokens":9e18}`, // twice: a sum past int64
		`{"prompt_tokens":-7,"completion_tokens":5}`,
		`{"prompt_tokens":1.5,"completion_tokens":5}`,
		`{"prompt_tokens":"7","completion_tokens":5}`,
		`{"prompt_tokens":16777217,"completion_tokens":5}`, // 2^24 + 1: past any context window
		`{"prompt_tokens":7,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":-1}}`,
	} {
		before := waitSettled(t, e, key)
		e.upstream.SetBehavior(standin.Behavior{Usage: usage})
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(faultChat), http.Header{"Authorization": {"Bearer " + key}})
		if _, err := io.ReadAll(res.Body); err != nil || res.StatusCode != http.StatusOK {
			t.Fatalf("%s: status %d, %v", usage, res.StatusCode, err)
		}
		reserved := before.Limits.Tokens.Remaining - atoi(t, res.Header.Get("X-Ratelimit-Remaining-Tokens"))
		u := waitSettled(t, e, key)
		if charged := u.Today.TotalTokens - before.Today.TotalTokens; reserved < 10 || charged != reserved {
			t.Errorf("%s: charged %d tokens, want the reservation of %d", usage, charged, reserved)
		}
		if u.Today.PromptTokens < 0 || u.Today.CompletionTokens < 0 || u.Today.TotalTokens > faultTokens {
			t.Errorf("%s: today's usage is %+v", usage, u.Today)
		}
	}

	e.upstream.SetBehavior(standin.Behavior{})
	client := newClient(e.caddy.URL, key)
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("and now a sane one")); err != nil {
		t.Fatal(err)
	}
	u := waitSettled(t, e, key)
	if u.Today.Requests != 9 {
		t.Errorf("today %d requests, want 9", u.Today.Requests)
	}
	e.wantStored(t, u)
}

// TestUsageLeftOutIsNotFree: an upstream whose usage object leaves out
// completion_tokens (or gives it as null) did not answer for free. Each
// answer here writes its cap, 100 tokens, and is charged them: as
// total_tokens less the prompt, when the usage gives both; as all the
// output a whole answer reserved; as what a stream carried.
func TestUsageLeftOutIsNotFree(t *testing.T) {
	e, key := startFaults(t, time.Minute)
	const chat = `{"model":"vigthoria-fast-1","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}`
	for _, tc := range []struct{ usage, body string }{
		{`{"prompt_tokens":5,"total_tokens":105}`, chat},
		{`{"prompt_tokens":5,"completion_tokens":null}`, chat},
		{`{"prompt_tokens":5}`, strings.Replace(chat, `"max_tokens":100`, `"max_tokens":100,"stream":true`, 1)},
	} {
		before := waitSettled(t, e, key)
		e.upstream.SetBehavior(standin.Behavior{Usage: tc.usage})
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(tc.body), http.Header{"Authorization": {"Bearer " + key}})
		if _, err := io.ReadAll(res.Body); err != nil || res.StatusCode != http.StatusOK {
			t.Fatalf("%s: status %d, %v", tc.usage, res.StatusCode, err)
		}
		u := waitSettled(t, e, key)
		prompt, completion := u.Today.PromptTokens-before.Today.PromptTokens, u.Today.CompletionTokens-before.Today.CompletionTokens
		if prompt != 5 || completion != 100 {
			t.Errorf("usage %s, 100 tokens answered: charged %d prompt and %d completion tokens, want 5 and 100", tc.usage, prompt, completion)
		}
	}
}

// earlyUsageUpstream streams a chat whose only usage object comes in its
// first chunk (the prompt counted, no output yet), then deltas content
// tokens, then breaks off (done false) or ends with [DONE] (done true).
func earlyUsageUpstream(deltas int, done bool) *httptest.Server {
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		send := func(s string) {
			io.WriteString(w, "data: "+s+"\n\n")
			http.NewResponseController(w).Flush()
		}
		head := `{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"vigthoria-fast-1",`
		send(head + `"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":{"prompt_tokens":5,"completion_tokens":0,"total_tokens":5}}`)
		for i := range deltas {
			send(head + `"choices":[{"index":0,"delta":{"content":" word` + strconv.Itoa(i) + `"},"finish_reason":null}],"usage":null}`)
		}
		if !done {
			panic(http.ErrAbortHandler)
		}
		send(head + `"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":null}`)
		send("[DONE]")
	}))
}

// TestStreamOutputAfterItsUsageIsCharged: a stream whose usage object
// came before its output (the prompt alone) and then carried 40 tokens
// is charged those 40, whether the upstream broke it off (a stream cut
// short is charged what it streamed) or ended it with no later usage.
func TestStreamOutputAfterItsUsageIsCharged(t *testing.T) {
	const deltas = 40
	for _, done := range []bool{false, true} {
		t.Run("ended="+strconv.FormatBool(done), func(t *testing.T) {
			srv := earlyUsageUpstream(deltas, done)
			t.Cleanup(srv.Close)
			e := startOn(t, standin.New(standin.Options{APIKey: serverKey}), srv, srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", manyFailures, faultTier)
			key, _ := e.meteredKey(t)
			res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(
				`{"model":"vigthoria-fast-1","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi"}]}`),
				http.Header{"Authorization": {"Bearer " + key}})
			raw, _ := io.ReadAll(res.Body)
			if got := strings.Count(string(raw), `"content":" word`); got != deltas {
				t.Fatalf("the caller got %d deltas, want %d", got, deltas)
			}
			u := waitSettled(t, e, key)
			if u.Today.PromptTokens != 5 || u.Today.CompletionTokens != deltas {
				t.Errorf("charged %d prompt and %d completion tokens, want 5 and the %d streamed", u.Today.PromptTokens, u.Today.CompletionTokens, deltas)
			}
		})
	}
}

// TestUsagePastTheCapIsBounded: an upstream that reports 100,000
// completion tokens for requests sent max_tokens 100 (it ignored the cap,
// or misreports) is believed only as far as its answers carried output:
// the deltas of a stream, the bytes of a whole answer, and never less
// than the cap. A budget is overshot by what the caller could have been
// given, not by the report. The operator sees each such answer: a warning
// naming the key ID, never the key, and vigthoria_usage_past_cap_total.
func TestUsagePastTheCapIsBounded(t *testing.T) {
	e := start(t, manyFailures, testPrices, "tier capped {\n\t\t\tbudget 0.01/day\n\t\t}")
	id, key := e.addKey(t, "capped")
	e.waitKeysKnown(t)
	const series = `vigthoria_usage_past_cap_total{tier="capped"}`
	pastBefore := metricValue(t, e, series)
	e.upstream.SetBehavior(standin.Behavior{Usage: `{"prompt_tokens":9,"completion_tokens":100000,"total_tokens":100009}`})

	var charged usageCounts
	for _, tc := range []struct {
		name, body string
		want       func(answer []byte) int64
	}{
		{"stream", `{"model":"vigthoria-fast-1","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi"}]}`,
			func([]byte) int64 { return 100 }},
		{"whole answer", `{"model":"vigthoria-fast-1","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}`,
			func(answer []byte) int64 { return int64(len(answer)) }},
	} {
		before, _ := e.usage(t, key)
		res := e.do(t, http.MethodPost, "/v1/chat/completions", strings.NewReader(tc.body), http.Header{"Authorization": {"Bearer " + key}})
		answer, err := io.ReadAll(res.Body)
		if err != nil || res.StatusCode != http.StatusOK {
			t.Fatalf("%s: status %d, %v", tc.name, res.StatusCode, err)
		}
		var u usageAnswer
		eventually(t, "the request is settled", func() bool {
			u, _ = e.usage(t, key)
			return u.Today.Requests == before.Today.Requests+1
		})
		got := u.Today.CompletionTokens - before.Today.CompletionTokens
		if want := tc.want(answer); got != want {
			t.Errorf("%s: charged %d completion tokens, want %d of the reported 100000", tc.name, got, want)
		}
		charged.PromptTokens += u.Today.PromptTokens - before.Today.PromptTokens
		charged.CompletionTokens += got
	}
	cost := charged.PromptTokens*10 + charged.CompletionTokens*20
	t.Logf("charged %d prompt and %d completion tokens for 200000 reported: %d micro-units of a %d budget (%.1fx)",
		charged.PromptTokens, charged.CompletionTokens, cost, budget, float64(cost)/budget)
	if cost > 3*budget {
		t.Errorf("one request's report overshot the budget %.1fx", float64(cost)/budget)
	}

	if got := metricValue(t, e, series); got != pastBefore+2 {
		t.Errorf("%s went from %v to %v, want 2 more", series, pastBefore, got)
	}
	log := e.caddy.ReadLog(t)
	if n := strings.Count(log, "the upstream reported more output than the cap"); n != 2 || !strings.Contains(log, `"client_id":"`+id+`"`) {
		t.Errorf("%d warnings about output past the cap, want 2 naming %s", n, id)
	}
	if strings.Contains(log, key) || strings.Contains(log, key[len(key)-8:]) {
		t.Error("the log holds the client key")
	}
}
