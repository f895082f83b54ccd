package tests

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/internal/harness"
)

// TestMakeRunDemo: the demo that make run starts, with Caddy as a process
// of its own (this test binary, which holds the same modules), serves the
// proxy with the key it prints and the dashboard behind the password it
// prints, names a taken port and how to choose another, and stops with
// status 0 on Ctrl-C.
func TestMakeRunDemo(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "demo")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/vigthoria/caddy-vigthoria/internal/cmd/demo").CombinedOutput(); err != nil {
		t.Fatalf("building the demo: %v\n%s", err, out)
	}
	port, page, dash := harness.FreePort(t), harness.FreePort(t), harness.FreePort(t)
	env := func(proxyPort int) []string {
		return append(os.Environ(), "VIGTHORIA_HARNESS_CADDY=1",
			"PORT="+strconv.Itoa(proxyPort), "PAGE_PORT="+strconv.Itoa(page), "DASHBOARD_PORT="+strconv.Itoa(dash))
	}
	cmd := exec.Command(bin, "-caddy", os.Args[0])
	cmd.Env = env(port)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})

	// The banner, up to the line that names the ports.
	lines := make(chan string)
	go func() {
		scanner := bufio.NewScanner(stdout)
		for scanner.Scan() {
			lines <- scanner.Text()
		}
		close(lines)
	}()
	var banner strings.Builder
	deadline := time.After(60 * time.Second)
read:
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				break read
			}
			banner.WriteString(line + "\n")
			if strings.HasPrefix(line, "Ports:") {
				go func() {
					for range lines {
					}
				}()
				break read
			}
		case <-deadline:
			t.Fatalf("no banner within 60s:\n%s", banner.String())
		}
	}
	text := banner.String()
	key := regexp.MustCompile(`vgt_[0-9A-Za-z]{38}`).FindString(text)
	password := regexp.MustCompile(`user operator, password (\S+)`).FindStringSubmatch(text)
	if key == "" || password == nil || !strings.Contains(text, "PORT="+strconv.Itoa(port)) {
		t.Fatalf("the banner names no key, dashboard password or ports:\n%s", text)
	}

	base := "http://localhost:" + strconv.Itoa(port)
	client := newClient(base, key)
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("hello")); err != nil {
		t.Errorf("a chat with the printed key: %v", err)
	}
	dashboard := "http://localhost:" + strconv.Itoa(dash) + "/"
	for _, tc := range []struct {
		user, password string
		want           int
	}{{"operator", password[1], http.StatusOK}, {"operator", "wrong", http.StatusUnauthorized}, {"", "", http.StatusUnauthorized}} {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, dashboard, nil)
		if tc.user != "" {
			req.SetBasicAuth(tc.user, tc.password)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != tc.want {
			t.Errorf("the dashboard with %q: %d, want %d", tc.password, res.StatusCode, tc.want)
		}
	}

	// A second demo on the same proxy port is told which port is taken.
	second := exec.Command(bin, "-caddy", os.Args[0])
	second.Env = env(port)
	out, err := second.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || !strings.Contains(string(out), "port "+strconv.Itoa(port)+", for the proxy, is taken: choose another with PORT") {
		t.Errorf("a demo on a taken port: %v, %s; want a failure naming the port and PORT", err, out)
	}

	// Ctrl-C: everything stops, and the demo ends with status 0.
	cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Errorf("the demo ended with %v on Ctrl-C, want status 0", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the demo did not stop within 20s of Ctrl-C")
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second); err == nil {
		c.Close()
		t.Error("the proxy's port still answers after Ctrl-C")
	}
}

// TestStandinCommand: the stand-in that make standin serves is an
// upstream a Caddyfile of one's own can point at: a chat through Caddy,
// with the server key it prints, is answered.
func TestStandinCommand(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "standin")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/vigthoria/caddy-vigthoria/internal/cmd/standin").CombinedOutput(); err != nil {
		t.Fatalf("building the stand-in: %v\n%s", err, out)
	}
	port := strconv.Itoa(harness.FreePort(t))
	cmd := exec.Command(bin, "-port", port, "-key", serverKey, "-delay", "0s")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	first, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || !strings.Contains(first, "http://127.0.0.1:"+port+"/v1") {
		t.Fatalf("the stand-in printed %q (%v), want its URL", first, err)
	}
	go io.Copy(io.Discard, stdout)

	e := newEnv(t, nil, nil)
	e.startCaddy(t, "http://127.0.0.1:"+port+"/v1", "{env.VIGTHORIA_TEST_KEY}")
	if _, err := e.client.Chat.Completions.New(t.Context(), chatParams("hello")); err != nil {
		t.Errorf("a chat through Caddy to the stand-in: %v", err)
	}

	cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("the stand-in ended with %v on Ctrl-C, want status 0", err)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("the stand-in did not stop within 10s of Ctrl-C")
	}
}
