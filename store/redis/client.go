package redis

import (
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// clients are this process's Redis clients: one per URL, shared by the
// stores opened on it and by the root's limiter and upstream state, and
// closed when the last user releases it. Two users share a client when
// the same timeouts suit both (see SharedClient).
var clients struct {
	sync.Mutex
	m map[clientKey]*sharedClient // guarded by the mutex
}

type clientKey struct {
	url     string
	timeout time.Duration // for reads and writes
}

type sharedClient struct {
	client *goredis.Client
	users  int
}

// SharedClient returns the client of the Redis at rawURL that this
// process shares, and the func that gives it back (the last one closes
// it). It does no I/O.
//
// Its options are the store's: the URL's query (dial_timeout=…,
// pool_size=…), else 2s timeouts, go-redis's pool size, no retries of
// commands (a write retried after a lost answer could apply twice) and
// one dial, and ContextTimeoutEnabled, so that a caller's deadline
// bounds its wait. Reads and writes wait at least minTimeout: a user
// whose calls wait longer than the store's (a limiter with a long
// store_timeout) gets a client of its own rather than answers cut short.
func SharedClient(rawURL string, minTimeout time.Duration) (*goredis.Client, func() error, error) {
	opts, err := goredis.ParseURL(rawURL)
	if err != nil {
		return nil, nil, err
	}
	for _, d := range []*time.Duration{&opts.DialTimeout, &opts.ReadTimeout, &opts.WriteTimeout, &opts.PoolTimeout} {
		if *d == 0 {
			*d = redisTimeout
		}
	}
	opts.ReadTimeout, opts.WriteTimeout = max(opts.ReadTimeout, minTimeout), max(opts.WriteTimeout, minTimeout)
	if opts.MaxRetries == 0 {
		opts.MaxRetries = -1
	}
	if opts.DialerRetries == 0 {
		opts.DialerRetries = 1 // fail fast: the Service tries again at its next poll
	}
	opts.ContextTimeoutEnabled = true
	opts.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}

	k := clientKey{rawURL, opts.ReadTimeout}
	clients.Lock()
	defer clients.Unlock()
	sc := clients.m[k]
	if sc == nil {
		if clients.m == nil {
			clients.m = make(map[clientKey]*sharedClient)
		}
		sc = &sharedClient{client: goredis.NewClient(opts)}
		clients.m[k] = sc
	}
	sc.users++
	var once sync.Once
	release := func() (err error) {
		once.Do(func() {
			clients.Lock()
			defer clients.Unlock()
			if sc.users--; sc.users == 0 {
				delete(clients.m, k)
				err = sc.client.Close()
			}
		})
		return err
	}
	return sc.client, release, nil
}
