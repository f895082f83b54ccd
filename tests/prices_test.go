package tests

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
)

// pricesLines configure prices per 1M tokens: vigthoria-fast-* at 0.10
// and 0.40 EUR, vigthoria-embed-* at 0.02 for input; vigthoria-pro-1 has
// none.
var pricesLines = []string{
	"currency EUR",
	"prices {\n\t\t\tvigthoria-embed-* input 0.02\n\t\t\tvigthoria-fast-* input 0.10 output 0.400001\n\t\t}",
}

// costOf is what the proxy charges for one request's usage: prompt ×
// input + completion × output, per million tokens, in micro-units (input
// and output in micro-units per 1M tokens), rounded up.
func costOf(prompt, completion, input, output int64) int64 {
	return (prompt*input + completion*output + 999_999) / 1_000_000
}

// micros writes a cost as GET /v1/usage and the CLI do.
func micros(n int64) string { return fmt.Sprintf("%d.%06d", n/1_000_000, n%1_000_000) }

// TestCostIsKeptAndReported: with prices configured, each request's
// cost at its model's price, computed from the usage the API returned,
// is what GET /v1/usage reports for today, the month and each model, what
// caddy vigthoria usage prints, and what a restart keeps; an unpriced
// model costs 0.
func TestCostIsKeptAndReported(t *testing.T) {
	e := start(t, pricesLines...)
	ctx := t.Context()
	var fast int64
	for _, prompt := range []string{"one", "a somewhat longer question, with more words in it", "three"} {
		params := chatParams(prompt)
		params.MaxTokens = openai.Int(40)
		res, err := e.client.Chat.Completions.New(ctx, params)
		if err != nil {
			t.Fatal(err)
		}
		if res.Usage.PromptTokens == 0 || res.Usage.CompletionTokens == 0 {
			t.Fatalf("usage %+v: want tokens to price", res.Usage)
		}
		fast += costOf(res.Usage.PromptTokens, res.Usage.CompletionTokens, 100_000, 400_001)
	}
	params := chatParams("streamed")
	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	stream := e.client.Chat.Completions.NewStreaming(ctx, params)
	var streamed openai.CompletionUsage
	for stream.Next() {
		if u := stream.Current().Usage; u.TotalTokens > 0 {
			streamed = u
		}
	}
	if err := stream.Err(); err != nil || streamed.TotalTokens == 0 {
		t.Fatalf("stream: usage %+v, %v", streamed, err)
	}
	fast += costOf(streamed.PromptTokens, streamed.CompletionTokens, 100_000, 400_001)

	emb, err := e.client.Embeddings.New(ctx, openai.EmbeddingNewParams{
		Model: "vigthoria-embed-1",
		Input: openai.EmbeddingNewParamsInputUnion{OfString: openai.String("embed this sentence")},
	})
	if err != nil {
		t.Fatal(err)
	}
	embed := costOf(emb.Usage.PromptTokens, 0, 20_000, 0)
	pro := chatParams("unpriced")
	pro.Model = "vigthoria-pro-1"
	if _, err := e.client.Chat.Completions.New(ctx, pro); err != nil {
		t.Fatal(err)
	}

	want := map[string]string{"vigthoria-fast-1": micros(fast), "vigthoria-embed-1": micros(embed), "vigthoria-pro-1": "0.000000"}
	total := micros(fast + embed)
	check := func(when string) string {
		t.Helper()
		var u usageAnswer
		eventually2s(t, "every request is settled", func() bool {
			u, _ = e.usage(t, e.key)
			return u.Today.Requests == 6
		})
		for name, c := range map[string]usageCounts{"today": u.Today, "month": u.Month} {
			if c.Cost == nil || c.Cost.Amount != total || c.Cost.Currency != "EUR" {
				t.Errorf("%s: %s's cost %+v, want %s EUR", when, name, c.Cost, total)
			}
		}
		if len(u.ByModel) != len(want) {
			t.Errorf("%s: by_model %+v, want %d models", when, u.ByModel, len(want))
		}
		for _, m := range u.ByModel {
			if m.Cost == nil || m.Cost.Amount != want[m.Model] || m.Cost.Currency != "EUR" {
				t.Errorf("%s: %s's cost %+v, want %s EUR", when, m.Model, m.Cost, want[m.Model])
			}
		}
		return u.ClientID
	}
	id := check("before the restart")

	e.caddy.Stop(t) // the ledger is written
	out := e.cli(t, "usage", id)
	header, rows, _ := strings.Cut(out, "\n")
	cost := slices.Index(strings.Fields(header), "COST")
	if cost < 3 {
		t.Fatalf("caddy vigthoria usage printed the header %q, want a COST column after MODEL", header)
	}
	for _, row := range strings.Split(strings.TrimSpace(rows), "\n") {
		f := strings.Fields(row)
		if len(f) <= cost || f[cost] != want[f[2]] {
			t.Errorf("caddy vigthoria usage printed %q, want the cost %s", row, want[f[2]])
		}
	}

	lines := append([]string{"store " + strings.Replace(e.store, ":", " ", 1), "tier free", "tier pro"}, pricesLines...)
	e.caddy.Restart(t, vigthoriaBlock(e.server.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", lines...))
	closeIdle()
	check("after the restart")
}
