package alerts

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Claimer records, in a store every instance shares, that an alert is
// being sent.
type Claimer interface {
	// Claim reports true to the first caller to claim id, across the
	// fleet, and false to every later one until the claim expires at
	// until.
	Claim(ctx context.Context, id string, until time.Time) (bool, error)
}

// Emitter emits a Caddy event: Caddy's events app, in a function.
type Emitter func(name string, data map[string]any)

// Figure is where a caller stands with one quota or budget, as the
// proxy knows it after a request settled.
type Figure struct {
	Type    string // Budget or Quota
	KeyID   string
	KeyName string
	Tier    string
	Period  string // PeriodName of the period the figure counts in
	Used    int64
	Limit   int64 // a figure without a positive limit crosses nothing
	// Requested is, for a refusal (QuotaRefused, BudgetRefused), what
	// the refused request would have reserved; 0 when it was refused
	// before it asked any, its quota already spent.
	Requested int64
}

// Config configures a Notifier.
type Config struct {
	// Thresholds in percent of a limit, each from 1 to 100.
	Thresholds []int
	// Claimer makes each alert once-only across the fleet. Required.
	Claimer Claimer
	// Emit emits the alert's Caddy event. Optional.
	Emit Emitter
	// Webhook sends the alert. Optional.
	Webhook *Sender
	// Logger: nil for none.
	Logger *zap.Logger
}

// Bounds of a Notifier.
const (
	defaultMemo  = 100_000 // crossings remembered
	claimQueue   = 1024    // crossings waiting for their claim
	claimTimeout = 10 * time.Second
	// claimGrace keeps a claim past its period's end, for clocks that
	// differ a little across the fleet.
	claimGrace = time.Hour
)

// DefaultThresholds are 80% and 100%.
var DefaultThresholds = []int{80, 100}

// CheckThresholds reports an error for a threshold outside 1 to 100.
func CheckThresholds(pcts []int) error {
	for _, p := range pcts {
		if p < 1 || p > 100 {
			return fmt.Errorf("alert threshold %d%% is not between 1%% and 100%%", p)
		}
	}
	return nil
}

// Notifier turns figures into alerts: Note is cheap enough for the
// request path, and the claim, the event and the webhook happen on the
// Notifier's own goroutine. Make one with NewNotifier; it is safe for
// concurrent use, and Close stops it.
type Notifier struct {
	thresholds []int // ascending, without repeats
	claimer    Claimer
	emit       Emitter
	webhook    *Sender
	logger     *zap.Logger

	memo memo
	jobs chan Alert

	cancel context.CancelFunc
	done   chan struct{}
}

// NewNotifier starts a Notifier.
func NewNotifier(cfg Config) (*Notifier, error) {
	if cfg.Claimer == nil {
		return nil, errors.New("alerts: a Notifier needs a Claimer")
	}
	if err := CheckThresholds(cfg.Thresholds); err != nil {
		return nil, err
	}
	t := slices.Compact(slices.Sorted(slices.Values(cfg.Thresholds)))
	n := &Notifier{thresholds: t, claimer: cfg.Claimer, emit: cfg.Emit, webhook: cfg.Webhook, logger: cfg.Logger,
		memo: memo{m: make(map[memoKey]bool), limit: defaultMemo}, jobs: make(chan Alert, claimQueue)}
	if n.logger == nil {
		n.logger = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel, n.done = cancel, make(chan struct{})
	go n.run(ctx)
	return n, nil
}

// Close stops the Notifier's goroutine and waits for it; crossings not
// yet claimed are dropped, and a later instance or config claims them.
func (n *Notifier) Close() {
	n.cancel()
	<-n.done
}

// Note looks at a figure. A figure of use (Quota, Budget), noted after a
// request settled, alerts for each threshold it has newly crossed (Used
// at least Percent of Limit): use alone crosses a threshold. A refusal
// (QuotaRefused, BudgetRefused), noted when a request was refused for
// want of quota or budget, alerts once per key and period, whatever its
// figures. An alert not yet seen by this Notifier is handed to the
// Notifier's goroutine, which claims it and, when this instance won the
// claim, emits the event vigthoria.<type> and enqueues the webhook. It
// never waits, and allocates nothing when nothing new is noted. A full
// queue drops the alert, which a later Note notes again.
func (n *Notifier) Note(f Figure) {
	if f.Limit <= 0 {
		return
	}
	if f.Type == QuotaRefused || f.Type == BudgetRefused {
		n.hand(f, 0)
		return
	}
	for _, pct := range n.thresholds {
		if !crossed(f.Used, f.Limit, pct) {
			return
		}
		n.hand(f, pct)
	}
}

// hand hands the alert of f at threshold pct (0 for a refusal) to the
// Notifier's goroutine, unless this Notifier saw it already.
func (n *Notifier) hand(f Figure, pct int) {
	k := memoKey{f.Type, f.KeyID, pct, f.Period}
	if !n.memo.add(k) {
		return
	}
	a := Alert{Type: f.Type, KeyID: f.KeyID, KeyName: f.KeyName, Tier: f.Tier, Period: f.Period,
		Used: f.Used, Limit: f.Limit, Percent: pct, Requested: f.Requested, At: time.Now()}
	select {
	case n.jobs <- a:
	default:
		n.memo.remove(k)
		dropped.Inc()
		n.logger.Error("alert claim queue full: alert dropped until the next request",
			zap.String("type", f.Type), zap.String("key_id", f.KeyID), zap.Int("percent", pct))
	}
}

// KeyState alerts that the server key named name was taken out of the
// pool (up false, with the upstream's status) or returned to it at at:
// once for the fleet, a key, state and minute. Only the webhook is sent:
// the Caddy event vigthoria.upstream_key is each instance's, emitted
// where the pool tells of it. It never waits.
func (n *Notifier) KeyState(name string, up bool, status int, at time.Time) {
	a := Alert{Type: UpstreamKey, KeyName: name, State: "disabled", Status: status, Period: at.UTC().Format(minuteLayout), At: at}
	if up {
		a.State = "enabled"
	}
	k := memoKey{a.Type, name + "|" + a.State, 0, a.Period}
	if !n.memo.add(k) {
		return
	}
	select {
	case n.jobs <- a:
	default:
		n.memo.remove(k)
		dropped.Inc()
		n.logger.Error("alert claim queue full: a server key's alert dropped", zap.String("key", name), zap.String("state", a.State))
	}
}

// crossed reports whether used is at least pct percent of limit, for
// any int64 figures.
func crossed(used, limit int64, pct int) bool {
	p := int64(pct)
	// pct% of limit, rounded up, without overflowing: limit/100*p + ceil(limit%100*p/100).
	return used >= limit/100*p+(limit%100*p+99)/100
}

// run claims the crossings Note hands over, until ctx ends.
func (n *Notifier) run(ctx context.Context) {
	defer close(n.done)
	for {
		select {
		case <-ctx.Done():
			return
		case a := <-n.jobs:
			n.claim(ctx, a)
		}
	}
}

// claim claims a in the store; when this instance won it, a is emitted
// and sent. A failed claim is forgotten, so that the next Note past the
// threshold tries again.
func (n *Notifier) claim(ctx context.Context, a Alert) {
	k := memoKey{a.Type, a.KeyID, a.Percent, a.Period}
	if a.Type == UpstreamKey {
		k.key = a.KeyName + "|" + a.State
	}
	end, err := periodEnd(a.Period)
	if err != nil {
		n.logger.Error("alert not sent", zap.String("key_id", a.KeyID), zap.Error(err))
		return
	}
	cctx, cancel := context.WithTimeout(ctx, claimTimeout)
	won, err := n.claimer.Claim(cctx, a.ClaimID(), end.Add(claimGrace))
	cancel()
	if err != nil {
		n.memo.remove(k)
		if ctx.Err() == nil {
			claimErrors.Inc()
			n.logger.Error("claiming an alert", zap.String("type", a.Type), zap.String("key_id", a.KeyID),
				zap.Int("percent", a.Percent), zap.Error(err))
		}
		return
	}
	if !won {
		return // another instance, or an earlier config, sent it
	}
	n.logger.Info("alert", zap.String("type", a.Type), zap.String("key_id", a.KeyID), zap.String("tier", a.Tier),
		zap.String("period", a.Period), zap.Int("percent", a.Percent), zap.Int64("used", a.Used), zap.Int64("limit", a.Limit), zap.Int64("requested", a.Requested))
	if n.emit != nil && a.Type != UpstreamKey {
		n.emit("vigthoria."+a.Type, a.EventData())
	}
	if n.webhook != nil {
		n.webhook.Enqueue(a)
	}
}

// memoKey names a crossing.
type memoKey struct {
	typ, key string
	pct      int
	period   string
}

// memo is the bounded set of crossings a Notifier has handed over: a
// crossing in it costs Note nothing more. When full, it starts over:
// the store's claims still keep each alert once-only.
type memo struct {
	mu    sync.RWMutex // protects m
	m     map[memoKey]bool
	limit int
}

// add adds k and reports whether it was new.
func (m *memo) add(k memoKey) bool {
	m.mu.RLock()
	seen := m.m[k]
	m.mu.RUnlock()
	if seen {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m[k] {
		return false
	}
	if len(m.m) >= m.limit {
		clear(m.m)
	}
	m.m[k] = true
	return true
}

func (m *memo) remove(k memoKey) {
	m.mu.Lock()
	delete(m.m, k)
	m.mu.Unlock()
}
