package alerts

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Defaults of a Sender.
const (
	DefaultQueue   = 10_000
	DefaultTimeout = 10 * time.Second
	DefaultFirst   = 5 * time.Second
	DefaultMax     = 5 * time.Minute
	DefaultGiveUp  = time.Hour
)

// Backoff is when a failed delivery is tried again: First after the
// first failure, doubling up to Max, each wait shortened by a random
// part of up to a half (jitter), so that alerts failed together do not
// come back together; no attempt starts later than GiveUp after the
// first. Zero fields take the defaults: 5s, 5m, 1h.
type Backoff struct {
	First, Max, GiveUp time.Duration
}

// SenderConfig configures a Sender.
type SenderConfig struct {
	URL     string       // where alerts are POSTed
	Secret  Secret       // signs them
	Client  *http.Client // nil: a client with a 10s timeout
	Queue   int          // alerts waiting for a first attempt or a retry; 0: DefaultQueue
	Backoff Backoff
	Logger  *zap.Logger // nil: none
}

// Sender delivers alerts to one webhook, in the background, one attempt
// at a time: Enqueue never waits and does no I/O. An alert is POSTed as
// JSON, signed; a 2xx answer delivers it, anything else is retried per
// the Backoff. Alerts still waiting when the Sender closes are lost, and
// logged. Make one with NewSender; it is safe for concurrent use.
type Sender struct {
	url     string
	secret  Secret
	client  *http.Client
	backoff Backoff
	logger  *zap.Logger
	limit   int // of queued plus pending alerts

	queue  chan Alert
	cancel context.CancelFunc
	done   chan struct{}
	close  sync.Once
}

// NewSender starts a Sender's worker; Close stops it.
func NewSender(cfg SenderConfig) *Sender {
	s := &Sender{url: cfg.URL, secret: cfg.Secret, client: cfg.Client, backoff: cfg.Backoff, logger: cfg.Logger, limit: cfg.Queue}
	if s.client == nil {
		// A redirect is an answer, not a delivery: following it would
		// post the signed alert to wherever the receiver points, inside
		// the network too.
		s.client = &http.Client{Timeout: DefaultTimeout, CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		}}
	}
	if s.limit <= 0 {
		s.limit = DefaultQueue
	}
	if s.logger == nil {
		s.logger = zap.NewNop()
	}
	b := &s.backoff
	b.First, b.Max, b.GiveUp = orDefault(b.First, DefaultFirst), orDefault(b.Max, DefaultMax), orDefault(b.GiveUp, DefaultGiveUp)
	s.queue = make(chan Alert, s.limit)
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.done = cancel, make(chan struct{})
	go s.run(ctx)
	return s
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Enqueue hands a to the worker and reports whether it was taken: when
// the queue is full, a is dropped, logged and counted.
func (s *Sender) Enqueue(a Alert) bool {
	select {
	case s.queue <- a:
		return true
	default:
		dropped.Inc()
		s.logger.Error("alert webhook queue full: alert dropped",
			zap.String("type", a.Type), zap.String("key_id", a.KeyID), zap.Int("percent", a.Percent), zap.String("period", a.Period))
		return false
	}
}

// Close stops the worker, ending an attempt under way, and waits for it.
func (s *Sender) Close() {
	s.close.Do(s.cancel)
	<-s.done
}

// message is an alert being delivered.
type message struct {
	alert   Alert
	id      string
	body    []byte
	first   time.Time // of the first attempt
	next    time.Time // of the next attempt
	attempt int       // attempts made
}

// run delivers what the queue brings and retries what failed, earliest
// first, until ctx ends.
func (s *Sender) run(ctx context.Context) {
	defer close(s.done)
	var pending []*message
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		var wake <-chan time.Time
		next := -1
		for i, m := range pending {
			if next < 0 || m.next.Before(pending[next].next) {
				next = i
			}
		}
		if next >= 0 {
			timer.Reset(time.Until(pending[next].next))
			wake = timer.C
		}
		select {
		case <-ctx.Done():
			if n := len(pending) + len(s.queue); n > 0 {
				s.logger.Warn("alert webhooks not delivered at shutdown", zap.Int("alerts", n))
			}
			return
		case a := <-s.queue:
			body, err := a.MarshalJSON()
			if err != nil { // a time.Time out of JSON's range
				s.logger.Error("encoding an alert", zap.Error(err))
				continue
			}
			m := &message{alert: a, id: a.WebhookID(), body: body, first: time.Now()}
			if s.attempt(ctx, m) {
				if len(pending) >= s.limit {
					dropped.Inc()
					s.logger.Error("alert webhook retries full: alert dropped", zap.String("webhook_id", m.id))
					continue
				}
				pending = append(pending, m)
			}
		case <-wake:
			m := pending[next]
			pending = append(pending[:next], pending[next+1:]...)
			if s.attempt(ctx, m) {
				pending = append(pending, m)
			}
		}
	}
}

// attempt tries to deliver m once, and reports whether to try again, at
// m.next.
func (s *Sender) attempt(ctx context.Context, m *message) (retry bool) {
	now := time.Now()
	m.attempt++
	err := s.post(ctx, m, now)
	if err == nil {
		delivered.Inc()
		return false
	}
	if ctx.Err() != nil {
		return true // stopped: counted as not delivered at shutdown
	}
	m.next = now.Add(s.backoff.delay(m.attempt))
	if m.next.Sub(m.first) > s.backoff.GiveUp {
		failedGaveUp.Inc()
		s.logger.Error("alert webhook not delivered: giving up",
			zap.String("webhook_id", m.id), zap.String("type", m.alert.Type), zap.String("key_id", m.alert.KeyID),
			zap.Int("percent", m.alert.Percent), zap.Int("attempts", m.attempt), zap.Error(err))
		return false
	}
	s.logger.Warn("alert webhook failed; retrying",
		zap.String("webhook_id", m.id), zap.Int("attempt", m.attempt), zap.Time("next", m.next), zap.Error(err))
	return true
}

// post sends m once, signed at now, counting a failure by its reason.
func (s *Sender) post(ctx context.Context, m *message, now time.Time) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(m.body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "caddy-vigthoria")
	req.Header.Set("webhook-id", m.id)
	req.Header.Set("webhook-timestamp", strconv.FormatInt(now.Unix(), 10))
	req.Header.Set("webhook-signature", s.secret.Sign(m.id, now, m.body))
	res, err := s.client.Do(req)
	if err != nil {
		failedConnection.Inc()
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10)) // lets the connection be reused
	res.Body.Close()
	if res.StatusCode/100 != 2 {
		failedStatus.Inc()
		return fmt.Errorf("the receiver answered %s", res.Status)
	}
	return nil
}

// delay is the wait after the nth failed attempt: First doubled n-1
// times, at most Max, less up to a half at random.
func (b Backoff) delay(n int) time.Duration {
	d := b.First
	for i := 1; i < n && d < b.Max; i++ {
		d *= 2
	}
	d = min(d, b.Max)
	return d - rand.N(d/2+1)
}
