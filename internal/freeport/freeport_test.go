package freeport

import (
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// childPort, in a child test process's environment, is the port it tries
// to hold; it exits 0 if it got it, 3 if another process holds it.
const childPort = "FREEPORT_TEST_HOLD"

func TestMain(m *testing.M) {
	if p := os.Getenv(childPort); p != "" {
		os.Exit(tryHold(p))
	}
	os.Exit(m.Run())
}

func tryHold(p string) int {
	port, err := strconv.Atoi(p)
	if err != nil {
		return 2
	}
	f, err := os.OpenFile(lockFile, os.O_RDWR|os.O_CREATE, 0o666)
	if err != nil {
		return 2
	}
	defer f.Close()
	switch held, err := hold(f, port); {
	case err != nil:
		return 2
	case held:
		return 0
	default:
		return 3
	}
}

// holdInChild reports the exit code of a child process that tries to hold
// port.
func holdInChild(t *testing.T, port int) int {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childPort+"="+strconv.Itoa(port))
	err := cmd.Run()
	if err == nil {
		return 0
	}
	exit, ok := err.(*exec.ExitError)
	if !ok {
		t.Fatalf("running the child: %v", err)
	}
	return exit.ExitCode()
}

func TestTakeHoldsThePortFromOtherProcesses(t *testing.T) {
	port, err := Take()
	if err != nil {
		t.Fatal(err)
	}
	if code := holdInChild(t, port); code != 3 {
		t.Errorf("another process trying to hold port %d taken here: exit %d, want 3 (held elsewhere)", port, code)
	}
	// A port nobody took is the child's to hold, the lock being the
	// port's alone, not the file's; and it is free again once the child
	// ended. Port 7 is below the ports the kernel hands out for port 0.
	const untaken = 7
	if code := holdInChild(t, untaken); code != 0 {
		t.Errorf("another process trying to hold port %d, which nobody took: exit %d, want 0", untaken, code)
	}
	mu.Lock()
	held, err := hold(locks, untaken)
	mu.Unlock()
	if err != nil || !held {
		t.Errorf("holding port %d after the child that held it ended: %v, %v; want it held", untaken, held, err)
	}
}

func TestTakeNeverReturnsAPortTwice(t *testing.T) {
	seen := map[int]bool{}
	for range 200 {
		port, err := Take()
		if err != nil {
			t.Fatal(err)
		}
		if seen[port] {
			t.Fatalf("port %d returned twice", port)
		}
		seen[port] = true
	}
}
