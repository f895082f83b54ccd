package keys

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/caller"
	"github.com/vigthoria/caddy-vigthoria/caller/clientkey"
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// How the Service keeps up with its store.
const (
	// pollInterval is how often the store is asked for changes, so that
	// keys added, rotated or revoked elsewhere work or stop working
	// within a second.
	pollInterval = 250 * time.Millisecond

	// flushInterval is how often recorded uses are written, in one batch.
	flushInterval = 5 * time.Second

	// ledgerFlushInterval is how far the stored usage ledger may lag.
	ledgerFlushInterval = time.Second

	// usedGranularity is how stale a stored last-used time may be: a
	// key's use is recorded at most once per this many seconds.
	usedGranularity = 60

	// loadBatch is how many records a first load holds at once, when the
	// store can stream them.
	loadBatch = 10_000

	// opTimeout bounds one store operation of the Service, except the
	// first load, which loadTimeout bounds.
	opTimeout   = 10 * time.Second
	loadTimeout = 5 * time.Minute

	// maxStaleness bounds how long the index answers from memory when it
	// cannot sync with its store (the store is unreachable, or failing):
	// past it, every key is refused until a sync succeeds again, so that
	// a key revoked meanwhile works at most this long.
	maxStaleness = 2 * time.Minute
)

// errStopped is returned by Start after Stop.
var errStopped = errors.New("key service stopped: it cannot be started again")

// Service owns one store, its in-memory index, the loop that keeps the
// index in sync with the store and the batcher of last-used times. It is
// meant to be shared by the configs that use the same store, across
// reloads, and is safe for concurrent use. Its zero value is not usable:
// make one with NewService.
//
// While the store is unreachable the index keeps identifying callers from
// memory, for at most maxStaleness (2 minutes) after the last successful
// sync; after that it refuses every key until a sync succeeds again. A
// key revoked during an outage thus works at most that much longer. The
// failure, the refusal and the recoveries are logged once each.
type Service struct {
	spec       string // canonical: "sqlite:" and an absolute path, or "redis:" and the Redis URL
	name       string // spec for logs: without a Redis password
	logger     *zap.Logger
	open       func() (store.Backend, error)
	poll       time.Duration
	flushEvery time.Duration
	maxStale   time.Duration // maxStaleness but in tests

	index   index
	kick    chan chan struct{} // asks the loop to sync now; it closes the channel sent once done
	ledger  *ledger.Ledger
	signing signing

	usedMu sync.Mutex // protects used and spare
	used   []use      // recorded uses, waiting for the next flush
	spare  []use      // the last batch flushed, for reuse

	mu      sync.Mutex // protects the following
	state   int        // serviceNew, serviceStarted or serviceStopped
	store   store.Backend
	cancel  context.CancelFunc
	done    chan struct{}
	running sync.WaitGroup

	stale      atomic.Bool // the index is too old to answer from: see maxStaleness
	staleMu    sync.Mutex  // protects syncedAt and staleTimer
	syncedAt   time.Time   // of the last successful load or sync
	staleTimer *time.Timer // fires maxStale after syncedAt

	tiersMu sync.Mutex     // protects tiers
	tiers   map[string]int // the tiers of the configs using the Service: their handlers, per tier

	// Only Start and then the loop use these.
	cursor         uint64
	syncFailing    bool
	flushFailing   bool
	ledgerFailing  bool
	signingFailing bool
}

const (
	serviceNew = iota
	serviceStarted
	serviceStopped
)

// use is a recorded use of a key.
type use struct {
	id string
	at int64 // unix milliseconds
}

// NewService returns a Service for the store named by spec (see
// ParseSpec), not yet started. It does no I/O, so that validating a
// config touches nothing. A nil logger logs nothing.
func NewService(spec string, logger *zap.Logger) (*Service, error) {
	kind, target, err := store.ParseSpec(spec)
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	return &Service{
		spec:       kind + ":" + target,
		name:       store.Display(kind, target),
		logger:     logger,
		open:       func() (store.Backend, error) { return store.OpenTarget(kind, target) },
		poll:       pollInterval,
		flushEvery: flushInterval,
		maxStale:   maxStaleness,
		kick:       make(chan chan struct{}),
		ledger:     ledger.New(logger),
	}, nil
}

// Start opens the store, loads every key into memory and starts keeping
// up with the store. Calling it again, even concurrently, does nothing
// more; after a failure it may be called again. It fails after Stop.
func (s *Service) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch s.state {
	case serviceStarted:
		return nil
	case serviceStopped:
		return errStopped
	}
	begin := time.Now()
	st, err := s.open()
	if err != nil {
		return err
	}
	if err := s.load(st); err != nil {
		s.index.clear() // a retry loads into an empty index
		st.Close()
		return fmt.Errorf("loading keys: %w", err)
	}
	s.store = st
	s.ledger.Attach(st)
	s.state = serviceStarted
	s.markSynced()
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.done = make(chan struct{})
	s.running.Add(1)
	go s.run(ctx, st, s.done)
	registerService(s)
	s.logger.Info("key store open",
		zap.String("store", s.name),
		zap.Int("keys", s.index.size()),
		zap.Duration("load_time", time.Since(begin)))
	return nil
}

// Stop stops keeping up with the store, writes the last-used times not
// yet written, and closes the store. A stopped Service identifies no one
// and cannot be started again.
func (s *Service) Stop() error {
	s.mu.Lock()
	if s.state != serviceStarted {
		s.state = serviceStopped
		s.mu.Unlock()
		return nil
	}
	s.state = serviceStopped
	unregisterService(s)
	s.cancel()
	close(s.done)
	// The loop may be taking s.mu (Store, for the signing keys): waiting
	// for it with the lock held would wait forever.
	s.mu.Unlock()
	s.running.Wait()
	s.staleMu.Lock()
	if s.staleTimer != nil {
		s.staleTimer.Stop()
		s.staleTimer = nil // checkStale, if waiting for the lock, does nothing
	}
	s.staleMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	err := errors.Join(s.flush(ctx, s.store), s.ledger.Flush(ctx))
	s.ledger.Attach(nil)
	s.index.clear()
	if cerr := s.store.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("closing key store: %w", cerr))
	}
	return err
}

// Ledger returns the Service's usage ledger. It can count from the start;
// it reads and writes its store once the Service has started.
func (s *Service) Ledger() *ledger.Ledger { return s.ledger }

// Store returns the Service's store, for managing keys; nil before Start.
// Changes made through it, or by anyone else, reach the Service within a
// second.
func (s *Service) Store() store.Backend {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store
}

// changed tells the Service that its store was just changed and waits
// until its index holds the change, so that the change applies to the
// next request: an operator's command returns only then. The loop owns
// the index's cursor, so it syncs, and this waits for it (or for ctx, or
// for Stop).
func (s *Service) changed(ctx context.Context) {
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	if done == nil {
		return // not started: Start loads everything
	}
	synced := make(chan struct{})
	select {
	case s.kick <- synced:
	case <-done:
		return
	case <-ctx.Done():
		return
	}
	select {
	case <-synced:
	case <-done:
	case <-ctx.Done():
	}
}

// Identify returns the client whose key is secret, if that key is known,
// not revoked and not expired at now, with the key's settings. It
// records the use (at most once a minute per key, written later in a
// batch). It takes no lock and allocates nothing; a malformed key costs
// no hashing and no lookup.
func (s *Service) Identify(secret string, now time.Time) (caller.Client, bool) {
	if !clientkey.Valid(secret) || s.stale.Load() {
		return caller.Client{}, false
	}
	h := store.HashSecret(secret)
	v := s.index.view()
	e := v.lookup(&h)
	if e == nil || e.expires != 0 && now.UnixMilli() >= e.expires {
		return caller.Client{}, false
	}
	s.markUsed(e, now)
	id := e.id()
	return caller.Client{ID: id, Name: e.name(), Tier: v.tiers[e.tier], Settings: s.index.settingsOf(id)}, true
}

// Settings returns the settings of the live key id, such as the key
// that minted a caller's token, or nil when it has none (or is not
// known). It takes no lock and allocates nothing.
func (s *Service) Settings(id string) *policy.Settings {
	return s.index.settingsOf(id)
}

// Tiers returns the number of active keys per tier.
func (s *Service) Tiers() map[string]int {
	return s.index.tierCounts(time.Now())
}

// markUsed records a use of e at now, unless one was recorded within
// usedGranularity: the common case takes one atomic load and no lock.
func (s *Service) markUsed(e *entry, now time.Time) {
	sec := now.Unix()
	last := e.lastUsed.Load()
	if sec < int64(last)+usedGranularity || sec > math.MaxUint32 {
		return
	}
	if !e.lastUsed.CompareAndSwap(last, uint32(sec)) {
		return // another request recorded it
	}
	s.usedMu.Lock()
	s.used = append(s.used, use{id: e.id(), at: now.UnixMilli()})
	s.usedMu.Unlock()
}

// load fills the index with every key in st.
func (s *Service) load(st store.Backend) error {
	ctx, cancel := context.WithTimeout(context.Background(), loadTimeout)
	defer cancel()
	n, err := st.CountKeys(ctx)
	if err != nil {
		return err
	}
	s.index.grow(n)
	s.cursor, err = st.LoadAll(ctx, loadBatch, func(recs []store.Record) {
		s.logSkipped(s.index.loadNew(recs))
	})
	if err != nil {
		return err
	}
	// Revoked keys were counted, but take no room.
	s.index.trim()
	return nil
}

// run keeps the index in sync with st and writes recorded uses, until
// done is closed.
func (s *Service) run(ctx context.Context, st store.Backend, done <-chan struct{}) {
	defer s.running.Done()
	poll := time.NewTicker(s.poll)
	defer poll.Stop()
	flush := time.NewTicker(s.flushEvery)
	defer flush.Stop()
	ledger := time.NewTicker(ledgerFlushInterval)
	defer ledger.Stop()
	for {
		select {
		case <-done:
			return
		case <-ledger.C:
			ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
			err := s.ledger.Flush(ctx)
			cancel()
			s.logTransition(&s.ledgerFailing, err, "writing the usage ledger")
		case <-poll.C:
			s.sync(ctx, st)
			s.keepSigningKeys(ctx)
		case synced := <-s.kick:
			s.sync(ctx, st)
			close(synced)
		case <-flush.C:
			// Not the loop's context: Stop waits for a batch in flight
			// rather than dropping it.
			ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
			err := s.flush(ctx, st)
			cancel()
			s.logTransition(&s.flushFailing, err, "writing last-used times")
		}
	}
}

// sync applies the store's changes since the last sync to the index.
func (s *Service) sync(ctx context.Context, st store.Backend) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	recs, cursor, err := st.Changes(ctx, s.cursor)
	if errors.Is(err, store.ErrReset) {
		// What the index learned is history the store no longer has:
		// keys deleted with it must stop working, new ones must load.
		s.logger.Warn("key store was emptied or restored: reloading every key", zap.String("store", s.name))
		s.index.clear()
		s.cursor = 0
		recs, cursor, err = st.Changes(ctx, 0)
	}
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return // stopping
	}
	s.logTransition(&s.syncFailing, err, "reading key changes")
	if err != nil {
		return
	}
	if len(recs) > 0 {
		s.logSkipped(s.index.apply(recs))
		s.logger.Debug("key changes applied", zap.Int("changes", len(recs)))
	}
	s.cursor = cursor
	s.markSynced()
}

// markSynced notes a successful load or sync: the index may answer for
// maxStale more.
func (s *Service) markSynced() {
	s.staleMu.Lock()
	defer s.staleMu.Unlock()
	s.syncedAt = time.Now()
	if s.stale.Swap(false) {
		s.logger.Info("key store in sync again: accepting keys", zap.String("store", s.name))
	}
	if s.staleTimer == nil {
		s.staleTimer = time.AfterFunc(s.maxStale, s.checkStale)
	} else {
		s.staleTimer.Reset(s.maxStale)
	}
}

// checkStale runs when the index may have become too old to answer from.
func (s *Service) checkStale() {
	s.staleMu.Lock()
	defer s.staleMu.Unlock()
	if s.staleTimer == nil {
		return // stopped
	}
	if age := time.Since(s.syncedAt); age < s.maxStale {
		s.staleTimer.Reset(s.maxStale - age) // a sync raced the timer
		return
	}
	if !s.stale.Swap(true) {
		s.logger.Error("key store out of reach for too long: refusing every key until it is back",
			zap.String("store", s.name), zap.Duration("max_staleness", s.maxStale))
	}
}

// flush writes the recorded uses to st in one batch. A failed batch is
// dropped: last-used times are advisory, and keeping them could grow
// without bound while the store is down.
func (s *Service) flush(ctx context.Context, st store.Backend) error {
	s.usedMu.Lock()
	batch := s.used
	s.used, s.spare = s.spare, nil
	s.usedMu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	latest := make(map[string]time.Time, len(batch))
	for _, u := range batch {
		if at := time.UnixMilli(u.at); at.After(latest[u.id]) {
			latest[u.id] = at
		}
	}
	clear(batch)
	s.usedMu.Lock()
	s.spare = batch[:0]
	s.usedMu.Unlock()
	return st.TouchLastUsed(ctx, latest)
}

// logTransition logs when an operation starts failing and when it
// recovers, rather than at every attempt.
func (s *Service) logTransition(failing *bool, err error, what string) {
	switch {
	case err != nil && !*failing:
		s.logger.Error(what+" failed; retrying", zap.String("store", s.name), zap.Error(err))
	case err == nil && *failing:
		s.logger.Info(what+" works again", zap.String("store", s.name))
	}
	*failing = err != nil
}

// logSkipped reports keys the index cannot hold.
func (s *Service) logSkipped(ids []string) {
	if len(ids) > 0 {
		s.logger.Error("keys left out of the index: an ID over 255 bytes, or too many tiers",
			zap.Strings("ids", ids))
	}
}

// Source is the service as the identity source of client keys.
func (s *Service) Source() caller.Source { return keySource{s} }

// keySource names the caller of a bearer credential shaped like a client
// key (vgt_…): its key, if live.
type keySource struct{ s *Service }

func (k keySource) Identify(q caller.Request) (caller.Client, caller.Verdict, *api.Error) {
	secret, ok := q.Bearer()
	if !ok || !clientkey.Valid(secret) {
		return caller.Client{}, caller.Pass, nil
	}
	if c, ok := k.s.Identify(secret, q.Now); ok {
		return c, caller.Found, nil
	}
	return caller.Client{}, caller.Refused, nil
}
