package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

const (
	// admitBenchmark measures admission and settlement on the in-memory
	// limiter.
	admitBenchmark = "BenchmarkMemoryAdmitSettle"
	// rememberedBenchmark measures accepting a JWT remembered from its
	// first verification.
	rememberedBenchmark = "BenchmarkVerifyToken/remembered"
	// skippedBenchmark takes about 30 seconds to build its store.
	skippedBenchmark = "BenchmarkLoadSQLite"
)

// microCommand is the go test command line of the micro-benchmarks.
func microCommand(goCmd string) []string {
	return []string{goCmd, "test", "-run", "^$", "-bench", ".", "-skip", "^" + skippedBenchmark + "$",
		"-benchmem", "-benchtime", "1s", "./limiter/", "./caller/keys/", "./caller/token/", "./ledger/", "./policy/", "./proxy/", "./proxy/wire/"}
}

// runMicro runs the micro-benchmarks, showing their output as it comes,
// and returns its package, benchmark and failure lines, also when some
// package failed (err then says so).
func runMicro(ctx context.Context, goCmd string) (string, error) {
	args := microCommand(goCmd)
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	// go test runs the test binaries as its children: in a process group
	// of their own, they all end when ctx does.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var out bytes.Buffer
	cmd.Stdout = io.MultiWriter(os.Stdout, &out)
	cmd.Stderr = io.MultiWriter(os.Stderr, &out)
	err := cmd.Run()
	var kept strings.Builder
	for line := range strings.Lines(out.String()) {
		if !slices.ContainsFunc(dropped, func(prefix string) bool { return strings.HasPrefix(line, prefix) }) {
			kept.WriteString(line)
		}
	}
	return withoutMachinePaths(ctx, goCmd, kept.String()), err
}

// withoutMachinePaths writes the paths of this machine in out (a failed
// benchmark's stack trace names its files) relative to the module, or to
// $GOROOT: the report is committed, and speaks of the project only.
func withoutMachinePaths(ctx context.Context, goCmd, out string) string {
	var pairs []string
	if wd, err := os.Getwd(); err == nil {
		pairs = append(pairs, wd+"/", "")
	}
	if root, err := exec.CommandContext(ctx, goCmd, "env", "GOROOT").Output(); err == nil && len(bytes.TrimSpace(root)) > 0 {
		pairs = append(pairs, string(bytes.TrimSpace(root))+"/", "$GOROOT/")
	}
	if len(pairs) == 0 {
		return out
	}
	return strings.NewReplacer(pairs...).Replace(out)
}

// dropped starts the lines of go test's output that the report leaves
// out: the machine is described once, and success goes without saying.
var dropped = []string{"goos:", "goarch:", "cpu:", "PASS", "ok "}

// allocsPerOp returns the allocs/op that the output of go test reports
// for the benchmark name.
func allocsPerOp(output, name string) (float64, bool) {
	for line := range strings.Lines(output) {
		fields := strings.Fields(line)
		// The name carries a -GOMAXPROCS suffix unless GOMAXPROCS is 1.
		if len(fields) == 0 || fields[0] != name && !strings.HasPrefix(fields[0], name+"-") {
			continue
		}
		for i := 1; i < len(fields); i++ {
			if fields[i] == "allocs/op" {
				n, err := strconv.ParseFloat(fields[i-1], 64)
				return n, err == nil
			}
		}
	}
	return 0, false
}
