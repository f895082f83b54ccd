package harness

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// processEnv marks a test binary started as a Caddy process.
const processEnv = "VIGTHORIA_HARNESS_CADDY"

// RunAsCaddy turns the test binary into Caddy itself when a test started
// it so (see StartProcess): call it first in TestMain. It does not return
// then.
func RunAsCaddy() {
	if os.Getenv(processEnv) == "1" {
		caddycmd.Main()
		os.Exit(0)
	}
}

// StartProcess runs a second Caddy, in its own process (the test binary
// itself, which holds the same modules as a Caddy built by xcaddy), with
// one site on a free port, and stops it when the test ends. It is how a
// test gets a fleet of two.
func StartProcess(t testing.TB, site string) *Caddy {
	t.Helper()
	c := &Caddy{Port: FreePort(t), Dir: t.TempDir()}
	c.URL = fmt.Sprintf("http://127.0.0.1:%d", c.Port)
	c.AdminURL = fmt.Sprintf("http://127.0.0.1:%d", FreePort(t))
	c.LogPath = filepath.Join(c.Dir, "caddy.log")
	config := filepath.Join(c.Dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(c.Caddyfile(site)), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "run", "--config", config, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), processEnv+"=1",
		"XDG_DATA_HOME="+filepath.Join(c.Dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(c.Dir, "config"))
	out, err := os.Create(filepath.Join(c.Dir, "stderr.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting a Caddy process: %v", err)
	}
	c.Pid = cmd.Process.Pid
	exited := make(chan struct{})
	go func() { cmd.Wait(); out.Close(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		res, err := http.Get(c.AdminURL + "/config/")
		if err == nil {
			res.Body.Close()
			return c
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(filepath.Join(c.Dir, "stderr.log"))
			t.Fatalf("the Caddy process exited: %s", lastLines(string(b), 20))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("the Caddy process did not start within 30s")
		}
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "\n")
}
