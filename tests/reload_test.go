package tests

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// TestReloadUnderLoad reloads the config 20 times while clients of the
// official library send plain and streamed chats: none of them may fail,
// and the limiter must have counted every admitted request across all
// the configs.
func TestReloadUnderLoad(t *testing.T) {
	// So long a window that the bucket refills by less than one request
	// during the test: what is missing from it was admitted.
	const limit = 1000000
	tier := "tier metered {\n\t\t\trequests " + strconv.Itoa(limit) + "/100000h\n\t\t}"
	// An upstream that advertises more than the test ever sends: the
	// proxy rightly stops calling one whose requests are spent, and the
	// load would stop flowing after the default's 10,000.
	up := standin.New(standin.Options{APIKey: serverKey, RateLimit: 1e12})
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	e := startOn(t, up, srv, srv.URL+"/v1", "{env.VIGTHORIA_TEST_KEY}", manyFailures, tier)
	key, _ := e.meteredKey(t)
	conns := &connErrors{next: http.DefaultTransport}
	// The library's retries, as an application has them, over a redial
	// of a connection a reload reset before any handler saw it. A
	// keep-alive connection the old server closes as idle just as the
	// client sends on it ends in an EOF, which HTTP/1.1 leaves to the
	// client to retry. Four retries, not the library's default two: a
	// reload every 100 ms is far more often than any deployment's, and
	// in one CI run a request met that EOF on all three of its tries.
	client := openai.NewClient(option.WithBaseURL(e.caddy.URL+"/v1/"), option.WithAPIKey(key),
		option.WithMaxRetries(4), option.WithHTTPClient(&http.Client{Transport: redial{conns}}))
	calls := e.upstream.Count()

	const workers = 6
	ctx, stop := context.WithCancel(t.Context())
	defer stop()
	var ok, failed atomic.Int64
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				var err error
				if w%2 == 0 {
					stream := client.Chat.Completions.NewStreaming(ctx, chatParams("stream"))
					for stream.Next() {
					}
					err = stream.Err()
					stream.Close()
				} else {
					_, err = client.Chat.Completions.New(ctx, chatParams("plain"))
				}
				switch {
				case err == nil:
					ok.Add(1)
				case ctx.Err() != nil && errors.Is(err, context.Canceled):
					// stopped by the test
				default:
					failed.Add(1)
					firstErr.CompareAndSwap(nil, &err)
				}
			}
		})
	}
	const reloads = 20
	for i := range reloads {
		time.Sleep(100 * time.Millisecond)
		e.reload(t, manyFailures, tier, "max_body "+strconv.Itoa(i%3+1)+"MB")
	}
	time.Sleep(100 * time.Millisecond)
	stop()
	wg.Wait()

	t.Logf("%d reloads: %d requests succeeded, %d failed; %d connections reset or closed by a reload were retried by the client, by try: %v",
		reloads, ok.Load(), failed.Load(), conns.n.Load(), conns.byTry())
	if failed.Load() != 0 {
		t.Errorf("%d requests failed across the reloads; the first: %v", failed.Load(), *firstErr.Load())
	}
	if ok.Load() < reloads {
		t.Errorf("only %d requests succeeded: the load did not flow", ok.Load())
	}

	// Every request the upstream received was admitted once: the
	// limiter, carried across the configs, must have counted each, and
	// at most the workers' last requests, cut by the stop, besides.
	admitted := int64(e.upstream.Count() - calls)
	var counted int64
	deadline := time.Now().Add(2 * time.Second)
	for {
		u, _ := e.usage(t, key)
		if counted = limit - u.Limits.Requests.Remaining; counted >= admitted-1 && counted <= admitted+workers {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the limiter counted %d requests across the reloads, the upstream received %d: state was lost", counted, admitted)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// connErrors counts the requests that got no answer at all, which the
// client library then retries, and on which of a request's tries each
// came (the library numbers them in X-Stainless-Retry-Count).
type connErrors struct {
	next  http.RoundTripper
	n     atomic.Int64
	tries [5]atomic.Int64
}

func (c *connErrors) RoundTrip(req *http.Request) (*http.Response, error) {
	res, err := c.next.RoundTrip(req)
	if err != nil && req.Context().Err() == nil {
		c.n.Add(1)
		if try, convErr := strconv.Atoi(req.Header.Get("X-Stainless-Retry-Count")); convErr == nil && try >= 0 && try < len(c.tries) {
			c.tries[try].Add(1)
		}
	}
	return res, err
}

func (c *connErrors) byTry() []int64 {
	counts := make([]int64, len(c.tries))
	for i := range c.tries {
		counts[i] = c.tries[i].Load()
	}
	return counts
}
