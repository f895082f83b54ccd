package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// caddyCPU is the CPU every Caddy target runs on, or -1 when the targets
// are not pinned. pin sets it once, before any target starts.
var caddyCPU = -1

// pin gives the Caddy targets the last CPU to themselves and keeps this
// process, the load generator and the upstream, on the others. On a small
// machine the scheduler otherwise shares the cores between them
// differently from one round to the next, and the targets' ratios swing
// by more than the goals' margins; pinned, each target gets one whole CPU,
// and a ratio measures the work a request costs it.
func pin() error {
	n := runtime.NumCPU()
	if n < 2 {
		return errors.New("one CPU: nothing to pin apart")
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		return fmt.Errorf("taskset (util-linux) is needed to start Caddy on its CPU: %w", err)
	}
	var harness unix.CPUSet
	for cpu := range n - 1 {
		harness.Set(cpu)
	}
	// Every thread of this process: new ones inherit the set.
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, task := range tasks {
		tid, err := strconv.Atoi(task.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, &harness); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("pinning the harness: %w", err)
		}
	}
	caddyCPU = n - 1
	return nil
}

// pinnedCommand is the command that runs bin with args on caddyCPU, if
// the targets are pinned.
func pinnedCommand(bin string, args ...string) *exec.Cmd {
	if caddyCPU < 0 {
		return exec.Command(bin, args...)
	}
	return exec.Command("taskset", append([]string{"-c", strconv.Itoa(caddyCPU), bin}, args...)...)
}
