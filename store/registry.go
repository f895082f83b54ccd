package store

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
)

// A Driver opens one kind of backend. A backend package registers its
// Driver in its init, like a Caddy module, and the root imports the
// package for that; nothing else names the backend.
type Driver struct {
	// Kind names the backend, as ParseSpec reports it and as the
	// Caddyfile's store subdirective spells it: "sqlite", "redis".
	Kind string

	// Target checks a whole spec of this driver's scheme and returns its
	// canonical target, without I/O. Its error must not repeat a
	// password the spec may hold.
	Target func(spec string) (string, error)

	// Spec makes the spec of the Caddyfile's `store <Kind> <arg>`.
	Spec func(arg string) string

	// Open opens the backend at a canonical target.
	Open func(target string) (Backend, error)

	// Display is the target for logs and messages: without a password.
	Display func(target string) string
}

// drivers are the registered Drivers by the scheme of their specs.
var drivers struct {
	sync.RWMutex
	m map[string]*Driver
}

// Register makes the backend of d open specs "scheme:…". It panics if
// the scheme is taken, as caddy.RegisterModule does.
func Register(scheme string, d *Driver) {
	drivers.Lock()
	defer drivers.Unlock()
	if drivers.m == nil {
		drivers.m = make(map[string]*Driver)
	}
	if _, dup := drivers.m[scheme]; dup {
		panic("store: scheme registered twice: " + scheme)
	}
	drivers.m[scheme] = d
}

// driver returns the Driver of scheme, or nil.
func driver(scheme string) *Driver {
	drivers.RLock()
	defer drivers.RUnlock()
	return drivers.m[scheme]
}

// DefaultKind is the kind of the default store, DefaultSQLitePath.
const DefaultKind = "sqlite"

// ParseSpec parses a store spec: "sqlite:PATH" (kind "sqlite", PATH made
// absolute) or a "redis://" or "rediss://" URL (kind "redis", the URL),
// or the spec of another registered backend.
func ParseSpec(spec string) (kind, target string, err error) {
	d, target, err := parse(spec)
	if err != nil {
		return "", "", err
	}
	return d.Kind, target, nil
}

// parse returns the Driver of spec and its canonical target.
func parse(spec string) (*Driver, string, error) {
	scheme, _, ok := strings.Cut(spec, ":")
	if d := driver(scheme); ok && d != nil {
		target, err := d.Target(spec)
		return d, target, err
	}
	if u, err := url.Parse(spec); err == nil && u.User != nil {
		spec = u.Redacted()
	}
	return nil, "", fmt.Errorf("unknown key store '%s': use sqlite:PATH or redis://HOST:PORT/DB", spec)
}

// Open opens the store named by spec (see ParseSpec).
func Open(spec string) (Backend, error) {
	d, target, err := parse(spec)
	if err != nil {
		return nil, err
	}
	return d.Open(target)
}

// OpenTarget opens the store of ParseSpec's kind and target.
func OpenTarget(kind, target string) (Backend, error) {
	d := driver(kind)
	if d == nil {
		return nil, fmt.Errorf("unknown key store kind '%s'", kind)
	}
	return d.Open(target)
}

// SpecID names a store by its canonical spec (ParseSpec's kind and
// target, as "kind:target") without its secrets: what the CLI sends the
// admin API, whose log prints every request's URI and headers.
func SpecID(canonical string) string {
	sum := sha256.Sum256([]byte(canonical))
	return "id:" + hex.EncodeToString(sum[:8])
}

// Display is the canonical spec of ParseSpec's kind and target, for logs
// and messages: a Redis URL without its password.
func Display(kind, target string) string {
	if d := driver(kind); d != nil && d.Display != nil {
		return d.Display(target)
	}
	return kind + ":" + target
}

// DefaultSQLitePath is where the SQLite store lives by default, in
// Caddy's data directory.
func DefaultSQLitePath() string {
	return filepath.Join(caddy.AppDataDir(), "vigthoria", "vigthoria.db")
}

// SpecFromArgs reads the arguments of a Caddyfile's store subdirective,
// `sqlite [<path>]` or `redis <url>` (`<kind> <arg>` of any registered
// backend), into a store spec: "" for the default store. It returns
// false for anything else.
func SpecFromArgs(args []string) (spec string, ok bool) {
	switch {
	case len(args) == 1 && args[0] == DefaultKind:
		return "", true
	case len(args) == 2:
		if d := driver(args[0]); d != nil && d.Kind == args[0] {
			return d.Spec(args[1]), true
		}
	}
	return "", false
}
