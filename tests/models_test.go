package tests

import (
	"encoding/json"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

func modelIDs(t *testing.T, res *http.Response) []string {
	t.Helper()
	var list struct {
		Object string `json:"object"`
		Data   []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	body, _ := io.ReadAll(res.Body)
	if err := json.Unmarshal(body, &list); err != nil || list.Object != "list" {
		t.Fatalf("not a model list (%d): %s", res.StatusCode, body)
	}
	var ids []string
	for _, m := range list.Data {
		ids = append(ids, m.ID)
	}
	return ids
}

func TestModelsCacheSingleFlight(t *testing.T) {
	e := start(t)
	e.upstream.SetBehavior(standin.Behavior{Latency: 200 * time.Millisecond})
	var wg sync.WaitGroup
	statuses := make([]int, 200)
	for i := range statuses {
		wg.Go(func() { statuses[i] = e.status(t, http.MethodGet, "/v1/models", "", nil) })
	}
	wg.Wait()
	for i, s := range statuses {
		if s != http.StatusOK {
			t.Fatalf("request %d: status %d", i, s)
		}
	}
	e.wantUpstreamCalls(t, 1)
}

func TestModelsCacheLifecycle(t *testing.T) {
	e := start(t, "models_cache 300ms", "retries 0")

	first := e.do(t, http.MethodGet, "/v1/models", nil, nil)
	etag := first.Header.Get("Etag")
	if first.Header.Get("X-Cache") != "MISS" || etag == "" {
		t.Fatalf("first: X-Cache %q ETag %q, want a MISS with an ETag", first.Header.Get("X-Cache"), etag)
	}
	if hit := e.do(t, http.MethodGet, "/v1/models", nil, nil); hit.Header.Get("X-Cache") != "HIT" {
		t.Errorf("second: X-Cache %q, want HIT", hit.Header.Get("X-Cache"))
	}
	e.wantUpstreamCalls(t, 1)

	t.Run("If-None-Match is a 304", func(t *testing.T) {
		res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"If-None-Match": {etag}, "Authorization": {"Bearer " + e.key}})
		if body, _ := io.ReadAll(res.Body); res.StatusCode != http.StatusNotModified || len(body) != 0 {
			t.Errorf("status %d with %d bytes, want 304 and no body", res.StatusCode, len(body))
		}
	})
	t.Run("a caller without a key gets 401 though the list is cached", func(t *testing.T) {
		res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": nil})
		wantAPIError(t, res, http.StatusUnauthorized, "invalid_api_key")
	})
	t.Run("expired, the upstream failing: the stale list", func(t *testing.T) {
		time.Sleep(350 * time.Millisecond)
		e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusServiceUnavailable})
		res := e.do(t, http.MethodGet, "/v1/models", nil, nil)
		if res.StatusCode != http.StatusOK || res.Header.Get("X-Cache") != "STALE" || res.Header.Get("Warning") == "" {
			t.Errorf("status %d X-Cache %q Warning %q, want the stale list with a warning",
				res.StatusCode, res.Header.Get("X-Cache"), res.Header.Get("Warning"))
		}
		if len(modelIDs(t, res)) == 0 {
			t.Error("the stale list is empty")
		}
	})
	t.Run("expired, the upstream back: a fresh list", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{})
		calls := e.upstream.Count()
		res := e.do(t, http.MethodGet, "/v1/models", nil, nil)
		if res.Header.Get("X-Cache") != "MISS" || e.upstream.Count() != calls+1 {
			t.Errorf("X-Cache %q after %d upstream calls, want a MISS and one call", res.Header.Get("X-Cache"), e.upstream.Count()-calls)
		}
	})
	t.Run("purged through the admin API", func(t *testing.T) {
		res, err := http.Post(e.caddy.AdminURL+"/vigthoria/models/purge", "", nil)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusNoContent {
			t.Fatalf("purge: status %d", res.StatusCode)
		}
		calls := e.upstream.Count()
		if res := e.do(t, http.MethodGet, "/v1/models", nil, nil); res.Header.Get("X-Cache") != "MISS" || e.upstream.Count() != calls+1 {
			t.Errorf("after purge: X-Cache %q, want a MISS", res.Header.Get("X-Cache"))
		}
	})
}

func TestModelsFilteredPerTier(t *testing.T) {
	e := startTier(t, "models vigthoria-fast-* vigthoria-embed-*")
	key, client := e.meteredKey(t)
	page, err := client.Models.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
	}
	if len(ids) != 2 || ids[0] != "vigthoria-fast-1" || ids[1] != "vigthoria-embed-1" {
		t.Errorf("tier metered sees %v, want the fast and embed models", ids)
	}
	all := modelIDs(t, e.do(t, http.MethodGet, "/v1/models", nil, nil))
	if len(all) != 3 {
		t.Errorf("tier pro sees %v, want all three", all)
	}
	metered := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + key}})
	pro := e.do(t, http.MethodGet, "/v1/models", nil, nil)
	if metered.Header.Get("Etag") == pro.Header.Get("Etag") {
		t.Error("two different lists share an ETag")
	}
}

func TestRetries(t *testing.T) {
	e := start(t, "retries 2 max_wait 5s")

	t.Run("429 twice then 200, spaced as Retry-After says", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusTooManyRequests, FailCount: 2, RetryAfter: 1})
		calls := e.upstream.Count()
		if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("retry me")); err != nil {
			t.Fatalf("want the third attempt's 200, got %v", err)
		}
		reqs := e.upstream.Requests()[calls:]
		if len(reqs) != 3 {
			t.Fatalf("upstream saw %d attempts, want 3", len(reqs))
		}
		for i := 1; i < 3; i++ {
			if gap := reqs[i].At.Sub(reqs[i-1].At); gap < time.Second {
				t.Errorf("attempt %d came %v after the previous one, want at least the 1s of Retry-After", i+1, gap)
			}
			if string(reqs[i].Body) != string(reqs[0].Body) {
				t.Errorf("attempt %d sent another body", i+1)
			}
		}
	})
	t.Run("Retry-After past max_wait is not waited for", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{FailStatus: http.StatusServiceUnavailable, FailCount: 1, RetryAfter: 30})
		calls := e.upstream.Count()
		begin := time.Now()
		_, err := e.client.Chat.Completions.New(t.Context(), chatParams("no wait"))
		wantOpenAIError(t, err, http.StatusServiceUnavailable, "upstream_error")
		if e.upstream.Count() != calls+1 || time.Since(begin) > 5*time.Second {
			t.Errorf("%d attempts in %v, want one, answered at once", e.upstream.Count()-calls, time.Since(begin))
		}
	})
	t.Run("a stream that started is never retried", func(t *testing.T) {
		e.upstream.SetBehavior(standin.Behavior{FailMidStream: 2})
		calls := e.upstream.Count()
		stream := e.client.Chat.Completions.NewStreaming(t.Context(), chatParams("stream"))
		for stream.Next() {
		}
		if stream.Err() == nil {
			t.Error("the broken stream ended without error")
		}
		if e.upstream.Count() != calls+1 {
			t.Errorf("upstream saw %d attempts, want 1", e.upstream.Count()-calls)
		}
	})
}
