// Package harness starts real parts for tests, the demo and the benchmark:
// Caddy in this process from a Caddyfile, on free loopback ports.
package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	// The standard modules and ours, as a Caddy built by xcaddy has them.
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/vigthoria/caddy-vigthoria"
	"github.com/vigthoria/caddy-vigthoria/internal/freeport"
)

// FreePort returns a loopback TCP port that was free a moment ago and
// that no other test (of this process or another) was given (see
// freeport.Take).
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := freeport.Take()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// Caddy is a Caddy instance running in this process.
type Caddy struct {
	Port     int    // port of the site, on 127.0.0.1
	URL      string // http://127.0.0.1:Port
	AdminURL string // http://127.0.0.1:<admin port>
	LogPath  string // Caddy's log at debug level (INFO when Quiet), access log included
	Dir      string // storage and data directory of this instance
	Pid      int    // the process of a StartProcess instance; 0 in this process
	persist  bool   // autosave the config, as Caddy does by default
	quiet    bool   // no access log, and Caddy's log at INFO, as in make bench
	anyHost  bool   // the site answers every Host, not only 127.0.0.1
	global   string // more global options
}

// Option changes how StartCaddy runs Caddy.
type Option func(*Caddy)

// Persist lets Caddy autosave its config, as it does by default, into
// AutosavePath.
func Persist() Option {
	return func(c *Caddy) {
		c.persist = true
		// Caddy fixes the path when the process starts; keep it in the test.
		caddy.ConfigAutosavePath = c.AutosavePath()
	}
}

// Quiet runs Caddy as it runs by default, and as make bench runs it: no
// access log, and its own log at INFO, not DEBUG, where reverse_proxy
// logs every round trip. Benchmarks then measure the proxy, not the
// logging.
func Quiet() Option {
	return func(c *Caddy) { c.quiet = true }
}

// AnyHost makes the site answer requests for any Host (site address
// http://:<port>), as a catch-all site does; it still listens on
// 127.0.0.1 only.
func AnyHost() Option {
	return func(c *Caddy) { c.anyHost = true }
}

// Global adds lines to the global options block, such as a servers
// block.
func Global(lines string) Option {
	return func(c *Caddy) { c.global = lines }
}

// AutosavePath is where a Persist instance saves its config.
func (c *Caddy) AutosavePath() string { return filepath.Join(c.Dir, "autosave.json") }

// StartCaddy loads a config with one site on a free port in this process
// and stops Caddy when the test ends. site is the body of the site block;
// every `%PORT%` in it names the site's port. Only one Caddy runs in a
// process: calling it again replaces the config, as a reload does.
func StartCaddy(t testing.TB, site string, opts ...Option) *Caddy {
	t.Helper()
	c := &Caddy{Port: FreePort(t), Dir: t.TempDir()}
	for _, o := range opts {
		o(c)
	}
	c.URL = fmt.Sprintf("http://127.0.0.1:%d", c.Port)
	c.AdminURL = fmt.Sprintf("http://127.0.0.1:%d", FreePort(t))
	c.LogPath = filepath.Join(c.Dir, "caddy.log")
	t.Setenv("XDG_DATA_HOME", filepath.Join(c.Dir, "data"))
	t.Setenv("XDG_CONFIG_HOME", filepath.Join(c.Dir, "config"))

	if err := c.Load(site); err != nil {
		t.Fatalf("starting Caddy: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
	})
	return c
}

// Load adapts and loads a new site body into the running instance, as a
// config reload does.
func (c *Caddy) Load(site string) error {
	cfg, err := Adapt(c.Caddyfile(site))
	if err != nil {
		return err
	}
	return caddy.Load(cfg, true)
}

// Caddyfile returns the whole Caddyfile for a site body.
func (c *Caddy) Caddyfile(site string) string {
	site = strings.ReplaceAll(site, "%PORT%", fmt.Sprint(c.Port))
	return fmt.Sprintf(`{
	admin %s
	%s
	auto_https off
	storage file_system %s
%s
	log {
		output file %s
		level %s
	}
}

http://%s:%d {
	bind 127.0.0.1
%s%s
}
`, strings.TrimPrefix(c.AdminURL, "http://"), c.persistOption(), filepath.Join(c.Dir, "storage"), c.global, c.LogPath, c.logLevel(), c.siteHost(), c.Port, c.accessLog(), site)
}

// logLevel is the level of Caddy's own log.
func (c *Caddy) logLevel() string {
	if c.quiet {
		return "INFO"
	}
	return "DEBUG"
}

// accessLog is the site's access log, into LogPath beside Caddy's own,
// as an operator writes it: no filter, so that a test sees what a
// misplaced credential would leave there; none when Quiet.
func (c *Caddy) accessLog() string {
	if c.quiet {
		return ""
	}
	return "\tlog {\n\t\toutput file " + c.LogPath + "\n\t}\n"
}

// siteHost is the host of the site's address: none for AnyHost.
func (c *Caddy) siteHost() string {
	if c.anyHost {
		return ""
	}
	return "127.0.0.1"
}

// persistOption is the global option that keeps Caddy from autosaving,
// unless Persist asked for it.
func (c *Caddy) persistOption() string {
	if c.persist {
		return "# autosave on"
	}
	return "persist_config off"
}

// Adapt turns a Caddyfile into JSON config, failing on warnings too, since
// a warning in our own test config is a mistake.
func Adapt(caddyfile string) ([]byte, error) {
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		return nil, err
	}
	if len(warnings) > 0 {
		return nil, fmt.Errorf("adapting Caddyfile: %v", warnings)
	}
	return cfg, nil
}

// ReadLog returns everything Caddy logged so far.
func (c *Caddy) ReadLog(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(c.LogPath)
	if err != nil {
		t.Fatalf("reading Caddy's log: %v", err)
	}
	return string(b)
}

// Stop stops Caddy as a shutdown does: every module is cleaned up.
func (c *Caddy) Stop(t testing.TB) {
	t.Helper()
	if err := caddy.Stop(); err != nil {
		t.Fatalf("stopping Caddy: %v", err)
	}
}

// Restart starts a stopped instance again with a site body.
func (c *Caddy) Restart(t testing.TB, site string) {
	t.Helper()
	if err := c.Load(site); err != nil {
		t.Fatalf("restarting Caddy: %v", err)
	}
}

// WaitLog reports whether Caddy's log comes to contain s within two
// seconds: the access log line of a request is written after its
// response has reached the client.
func (c *Caddy) WaitLog(t testing.TB, s string) bool {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		if strings.Contains(c.ReadLog(t), s) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
