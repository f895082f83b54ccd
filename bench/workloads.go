package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"
)

// A workload is one kind of traffic, measured on every target.
type workload struct {
	name   string // short, for tables and progress
	about  string // one line for the report, Markdown
	stream bool   // run measures streams, not requests
	run    runFunc
}

// runFunc sends a workload to inst for d and says what it saw.
type runFunc func(ctx context.Context, inst *instance, d time.Duration) (sample, error)

// Names of the workloads the goals look at.
const (
	latencyWorkload  = "chat-1"
	chatWorkload     = "chat"
	signedInWorkload = "chat-jwt"
	mintedWorkload   = "chat-minted"
	modelsWorkload   = "models"
	streamWorkload   = "stream"
	profiledWorkload = chatWorkload
)

// workloads returns the workloads of a run, in the order they are measured.
func workloads(cfg config) []workload {
	return []workload{
		{
			name:  latencyWorkload,
			about: "small chat completion, not streamed, one connection: the latency the proxy adds to a request",
			run:   load(1, chatRequests(benchTier)),
		},
		{
			name:  chatWorkload,
			about: fmt.Sprintf("small chat completion, not streamed, %d connections: throughput", cfg.conns),
			run:   load(cfg.conns, chatRequests(benchTier)),
		},
		{
			name: signedInWorkload,
			about: fmt.Sprintf("small chat completion, not streamed, %d connections, from a user signed in with an OpenID provider: its RS256 JWT in place of a client key",
				cfg.conns),
			run: load(cfg.conns, chatRequests(signedIn)),
		},
		{
			name: mintedWorkload,
			about: fmt.Sprintf("small chat completion, not streamed, %d connections, from a user of an app whose backend minted it a token (`POST /vigthoria/tokens` with a key that may mint): that token in place of a client key, the same for the whole run, as a page sends it",
				cfg.conns),
			run: load(cfg.conns, chatRequests(minted)),
		},
		{
			name:  modelsWorkload,
			about: fmt.Sprintf("`GET /v1/models`, %d connections", cfg.conns),
			run:   load(cfg.conns, modelsRequests),
		},
		{
			name: "mix",
			about: fmt.Sprintf("small chat completions, %d connections, each request from the next of %d client keys of tiers %v with different limits (pro's with a budget in money, priced per request)",
				cfg.conns, keysPerTier*len(mixTiers), mixTiers),
			run: load(cfg.conns, chatRequests(mixTiers...)),
		},
		{
			name: streamWorkload,
			about: fmt.Sprintf("streamed chat completion of %d tokens, the upstream waiting %v between events, %d streams at once",
				streamTokens, cfg.chunkDelay, cfg.streams),
			stream: true,
			run:    streams(cfg.streams, cfg.chunkDelay),
		},
	}
}

// selectWorkloads keeps the workloads named in only, a comma-separated
// list; all of them when it is empty.
func selectWorkloads(all []workload, only string) ([]workload, error) {
	if only == "" {
		return all, nil
	}
	var kept []workload
	for name := range strings.SplitSeq(only, ",") {
		i := slices.IndexFunc(all, func(w workload) bool { return w.name == strings.TrimSpace(name) })
		if i < 0 {
			return nil, fmt.Errorf("no workload %q", name)
		}
		kept = append(kept, all[i])
	}
	return kept, nil
}

// sample is what one measurement of one workload on one target saw.
// For streams, the latencies are those of the first event.
type sample struct {
	ok       int     // requests (streams) answered in full
	errors   int     // the others
	firstErr string  // what the first error was
	rate     float64 // ok per second
	p50, p99 time.Duration
	// Streams only: the time between content events, and whole streams.
	gap50, gap99, dur50 time.Duration
	peakRSS             int64   // of the target's process, bytes; 0 when not known
	cpuPerReq           float64 // CPU time (user and system) of the target's process per request answered, ns; 0 when not known
	upstreamPerReq      float64 // requests the upstream got per request sent
}

var chatBody = []byte(`{"model":"vigthoria-fast-1","max_tokens":16,"messages":[{"role":"user","content":"Say hello in one short sentence."}]}`)

// chatRequests returns the small chat request of each client key of the
// tiers, interleaved so that consecutive requests come from other tiers.
func chatRequests(tiers ...string) func(*instance) []vegeta.Target {
	return func(inst *instance) []vegeta.Target {
		var tgts []vegeta.Target
		for i := range len(inst.keys[tiers[0]]) {
			for _, tier := range tiers {
				tgts = append(tgts, vegeta.Target{
					Method: http.MethodPost,
					URL:    inst.url + "/v1/chat/completions",
					Body:   chatBody,
					Header: http.Header{"Authorization": {"Bearer " + inst.keys[tier][i]}, "Content-Type": {"application/json"}},
				})
			}
		}
		return tgts
	}
}

func modelsRequests(inst *instance) []vegeta.Target {
	return []vegeta.Target{{
		Method: http.MethodGet,
		URL:    inst.url + "/v1/models",
		Header: http.Header{"Authorization": {"Bearer " + inst.keys[benchTier][0]}},
	}}
}

// load returns a workload's run that sends requests from conns workers,
// each sending its next request when its last one is answered.
func load(conns int, requests func(*instance) []vegeta.Target) runFunc {
	return func(ctx context.Context, inst *instance, d time.Duration) (sample, error) {
		n := uint64(conns)
		atk := vegeta.NewAttacker(vegeta.Client(inst.client), vegeta.Workers(n), vegeta.MaxWorkers(n), vegeta.Redirects(vegeta.NoFollow))
		defer context.AfterFunc(ctx, func() { atk.Stop() })()
		var c collector
		// The zero rate is "as fast as the workers go".
		for res := range atk.Attack(vegeta.NewStaticTargeter(requests(inst)...), vegeta.ConstantPacer{}, d, "") {
			c.add(res)
		}
		return c.sample(), ctx.Err()
	}
}

// collector gathers the results of one load measurement.
type collector struct {
	latencies  []time.Duration // of the requests answered 200
	errors     int
	firstErr   string
	begin, end time.Time
}

func (c *collector) add(r *vegeta.Result) {
	if c.begin.IsZero() || r.Timestamp.Before(c.begin) {
		c.begin = r.Timestamp
	}
	if end := r.End(); end.After(c.end) {
		c.end = end
	}
	if r.Code == http.StatusOK && r.Error == "" {
		c.latencies = append(c.latencies, r.Latency)
		return
	}
	if c.errors++; c.firstErr == "" {
		c.firstErr = fmt.Sprintf("%d %s %.200s", r.Code, r.Error, r.Body)
	}
}

func (c *collector) sample() sample {
	return sample{
		ok:       len(c.latencies),
		errors:   c.errors,
		firstErr: c.firstErr,
		rate:     perSecond(len(c.latencies), c.end.Sub(c.begin)),
		p50:      quantile(c.latencies, 0.50),
		p99:      quantile(c.latencies, 0.99),
	}
}

// streamTokens is the length of a streamed answer.
const streamTokens = 20

var streamBody = []byte(fmt.Sprintf(`{"model":"vigthoria-fast-1","stream":true,"max_tokens":%d,"messages":[{"role":"user","content":"Tell me a short story."}]}`, streamTokens))

// streamResult is what one stream looked like to its client.
type streamResult struct {
	firstEvent time.Duration   // from sending the request to the first event
	total      time.Duration   // to data: [DONE]
	gaps       []time.Duration // between consecutive content events
	err        error
}

// streams returns the stream workload's run: n clients, each opening its
// next stream when its last one ended, and none after d. The clients
// start spread over one chunk delay, so that their events do not all
// arrive at once.
func streams(n int, chunkDelay time.Duration) runFunc {
	return func(ctx context.Context, inst *instance, d time.Duration) (sample, error) {
		begin := time.Now()
		all := keepStreams(ctx, inst, n, chunkDelay, begin.Add(d), nil)
		return streamSample(all, time.Since(begin)), ctx.Err()
	}
}

// keepStreams keeps n streams open until the deadline, each client opening
// its next stream when its last one ended, and returns every stream's
// result; failed, if set, is told of each that failed. The clients start
// spread over one chunk delay, so that their events do not all arrive at
// once.
func keepStreams(ctx context.Context, inst *instance, n int, chunkDelay time.Duration, deadline time.Time, failed func(streamResult)) []streamResult {
	var (
		mu  sync.Mutex
		all []streamResult
		wg  sync.WaitGroup
	)
	for i := range n {
		wg.Go(func() {
			select {
			case <-time.After(time.Duration(i) * chunkDelay / time.Duration(n)):
			case <-ctx.Done():
			}
			for ctx.Err() == nil && time.Now().Before(deadline) {
				r := readStream(ctx, inst)
				if r.err != nil && failed != nil {
					failed(r)
				}
				mu.Lock()
				all = append(all, r)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return all
}

var (
	dataPrefix   = []byte("data: ")
	doneData     = []byte("[DONE]")
	contentDelta = []byte(`"delta":{"content":"`)
	errorData    = []byte(`{"error":`)
)

// readStream sends one streamed chat request and times its events as the
// client sees them.
func readStream(ctx context.Context, inst *instance) (r streamResult) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, inst.url+"/v1/chat/completions", bytes.NewReader(streamBody))
	if err != nil {
		return streamResult{err: err}
	}
	req.Header.Set("Authorization", "Bearer "+inst.keys[benchTier][0])
	req.Header.Set("Content-Type", "application/json")
	begin := time.Now()
	res, err := inst.client.Do(req)
	if err != nil {
		return streamResult{err: err}
	}
	defer func() {
		// To the end, so that the connection is used again.
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}()
	if res.StatusCode != http.StatusOK {
		return streamResult{err: fmt.Errorf("status %d", res.StatusCode)}
	}
	br := bufio.NewReaderSize(res.Body, 64<<10)
	var lastContent time.Time
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return streamResult{err: fmt.Errorf("stream ended before [DONE]: %w", err)}
		}
		now := time.Now()
		data, ok := bytes.CutPrefix(line, dataPrefix)
		switch {
		case !ok:
			continue // the empty line ending an event
		case r.firstEvent == 0:
			r.firstEvent = now.Sub(begin)
		}
		switch {
		case bytes.HasPrefix(data, doneData):
			r.total = now.Sub(begin)
			return r
		case bytes.HasPrefix(data, errorData):
			return streamResult{err: fmt.Errorf("error event: %s", bytes.TrimSpace(data))}
		case bytes.Contains(data, contentDelta):
			if !lastContent.IsZero() {
				r.gaps = append(r.gaps, now.Sub(lastContent))
			}
			lastContent = now
		}
	}
}

// streamSample sums up the streams of one measurement that lasted elapsed.
func streamSample(all []streamResult, elapsed time.Duration) sample {
	var s sample
	var first, gaps, totals []time.Duration
	for _, r := range all {
		if r.err != nil {
			if s.errors++; s.firstErr == "" {
				s.firstErr = r.err.Error()
			}
			continue
		}
		first = append(first, r.firstEvent)
		totals = append(totals, r.total)
		gaps = append(gaps, r.gaps...)
	}
	s.ok = len(first)
	s.rate = perSecond(s.ok, elapsed)
	s.p50, s.p99 = quantile(first, 0.50), quantile(first, 0.99)
	s.gap50, s.gap99 = quantile(gaps, 0.50), quantile(gaps, 0.99)
	s.dur50 = quantile(totals, 0.50)
	return s
}

// quantile returns the q-quantile of ds by nearest rank, sorting ds; 0
// for none.
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return ds[max(0, int(math.Ceil(q*float64(len(ds))))-1)]
}

func perSecond(n int, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}
