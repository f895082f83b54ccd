// Package redistest runs a real redis-server for tests and the benchmark,
// on a free loopback port, without persistence unless asked for it.
package redistest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/internal/freeport"
)

// Server is a redis-server process of one test.
type Server struct {
	Addr string // 127.0.0.1:port
	URL  string // redis://127.0.0.1:port/0
	port int
	dir  string
	args []string // given to every start, after the defaults
	cmd  *exec.Cmd
}

// Start runs redis-server for the test and stops it when the test ends,
// or fails the test when it is not installed: `make test` installs it.
func Start(t testing.TB) *Server {
	t.Helper()
	s, err := Run(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// StartWith is Start with more redis-server arguments, which override the
// defaults: StartWith(t, "--appendonly", "yes", "--appendfsync", "always")
// runs a durable server, which Restart brings back with its data.
func StartWith(t testing.TB, args ...string) *Server {
	t.Helper()
	s, err := RunWith(t.TempDir(), args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Run runs redis-server with its files in dir until Stop.
func Run(dir string) (*Server, error) { return RunWith(dir) }

// RunWith is Run with more redis-server arguments; see StartWith.
func RunWith(dir string, args ...string) (*Server, error) {
	if _, err := exec.LookPath("redis-server"); err != nil {
		return nil, errors.New("redis-server is not installed; `make test` installs it (Debian package redis-server)")
	}
	port, err := freeport.Take()
	if err != nil {
		return nil, err
	}
	s := &Server{port: port, dir: dir, args: args}
	s.Addr = "127.0.0.1:" + strconv.Itoa(port)
	s.URL = "redis://" + s.Addr + "/0"
	return s, s.start()
}

// Dir is where the server keeps its files.
func (s *Server) Dir() string { return s.dir }

// Stop ends the server.
func (s *Server) Stop() { s.kill() }

func (s *Server) start() error {
	// Later arguments win: s.args override the defaults.
	args := append([]string{
		"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.dir,
		"--protected-mode", "no"}, s.args...)
	s.cmd = exec.Command("redis-server", args...)
	// Should the process that started it die, the server goes too.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("starting redis-server: %w", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !s.ping() {
		if time.Now().After(deadline) {
			s.kill()
			return errors.New("redis-server did not answer within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// ping reports whether the server answers PING.
func (s *Server) ping() bool {
	c, err := net.DialTimeout("tcp", s.Addr, 200*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	fmt.Fprint(c, "PING\r\n")
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && line == "+PONG\r\n"
}

// Kill ends the server at once, as a crash does.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	s.kill()
}

func (s *Server) kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

// Restart starts a killed server again on the same port and directory,
// with the same arguments: empty, unless those gave it persistence, in
// which case it loads what it had written.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.kill()
	if err := s.start(); err != nil {
		t.Fatal(err)
	}
}

// Pause stops the server with SIGSTOP: connections stay open, nothing
// answers. Resume continues it.
func (s *Server) Pause(t testing.TB) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
}

// Resume continues a paused server.
func (s *Server) Resume(t testing.TB) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
}

// Client is a client of the Redis at url, closed when the test ends.
func Client(t testing.TB, url string) *goredis.Client {
	t.Helper()
	opts, err := goredis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	c := goredis.NewClient(opts)
	t.Cleanup(func() { c.Close() })
	return c
}
