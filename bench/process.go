package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// caddyProcess is a target's Caddy, run from the binary as a user runs it.
type caddyProcess struct {
	cmd      *exec.Cmd
	adminURL string
	logPath  string        // Caddy's own log; its stdout and stderr go to output
	output   string        // where a crash would show
	exited   chan struct{} // closed when the process has ended
	err      error         // how it ended, once exited is closed
}

// startCaddy writes caddyfile into dir and runs Caddy with it and with env
// added to this process's environment.
func startCaddy(bin, dir, caddyfile string, env []string, adminPort int) (*caddyProcess, error) {
	config := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(caddyfile), 0o600); err != nil {
		return nil, err
	}
	p := &caddyProcess{
		adminURL: fmt.Sprintf("http://127.0.0.1:%d", adminPort),
		logPath:  filepath.Join(dir, "caddy.log"),
		output:   filepath.Join(dir, "caddy.out"),
		exited:   make(chan struct{}),
	}
	out, err := os.Create(p.output)
	if err != nil {
		return nil, err
	}
	defer out.Close() // the child has its own copy
	p.cmd = pinnedCommand(bin, "run", "--config", config, "--adapter", "caddyfile")
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = out, out
	// Should this process die without stopping it, Caddy goes too.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// waitReady polls url with the bearer key until Caddy answers 200, and
// fails when it answers otherwise, exits, or 30 seconds pass.
func (p *caddyProcess) waitReady(ctx context.Context, client *http.Client, url, key string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		status, body, err := get(ctx, client, url, key)
		switch {
		case err == nil && status == http.StatusOK:
			return nil
		case err == nil:
			return fmt.Errorf("GET %s answered %d: %s", url, status, body)
		}
		select {
		case <-p.exited:
			return fmt.Errorf("caddy exited before it was ready (%v): %s", p.err, p.tail())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("caddy did not answer at %s within 30s: %s", url, p.tail())
}

// get sends one GET with a bearer key and returns the answer's status and
// the start of its body.
func get(ctx context.Context, client *http.Client, url, key string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	res, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 512))
	return res.StatusCode, body, err
}

// tail returns the end of what Caddy wrote, to explain a failure.
func (p *caddyProcess) tail() string {
	var all []byte
	for _, path := range []string{p.output, p.logPath} {
		b, _ := os.ReadFile(path) // a missing file has nothing to say
		all = append(all, b...)
	}
	all = bytes.TrimSpace(all)
	return string(all[max(0, len(all)-2000):])
}

// stop asks Caddy to stop, and kills it if it has not within 10 seconds.
func (p *caddyProcess) stop() {
	if p.cmd.Process.Signal(os.Interrupt) == nil {
		select {
		case <-p.exited:
			return
		case <-time.After(10 * time.Second):
		}
	}
	_ = p.cmd.Process.Kill() // fails only if it has just exited
	<-p.exited
}

// cpuTime returns the CPU time the process has used so far, user and
// system, from /proc/PID/stat.
func (p *caddyProcess) cpuTime() (time.Duration, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	return parseCPUTime(stat)
}

// clockTicks is the unit of /proc/PID/stat's times, USER_HZ, 100 on Linux.
const clockTicks = 100

// parseCPUTime reads utime and stime, fields 14 and 15 of /proc/PID/stat,
// counted after the command name, which may hold spaces.
func parseCPUTime(stat []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("no command name in /proc/PID/stat")
	}
	fields := bytes.Fields(stat[i+1:])
	if len(fields) < 13 {
		return 0, errors.New("short /proc/PID/stat")
	}
	var ticks int64
	for _, f := range fields[11:13] { // utime, stime: fields 14 and 15 of the whole line
		n, err := strconv.ParseInt(string(f), 10, 64)
		if err != nil {
			return 0, err
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// resetPeakRSS makes the kernel's peak resident set size (VmHWM) start
// again from the current one, so that the next peak belongs to the next
// measurement alone.
func (p *caddyProcess) resetPeakRSS() error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", p.cmd.Process.Pid), []byte("5"), 0)
}

// peakRSS returns VmHWM, the peak resident set size, in bytes.
func (p *caddyProcess) peakRSS() (int64, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	return statusBytes(status, "VmHWM:")
}

// statusBytes returns the field of /proc/PID/status, given in kB, in bytes.
func statusBytes(status []byte, field string) (int64, error) {
	for line := range bytes.Lines(status) {
		if v, ok := bytes.CutPrefix(line, []byte(field)); ok {
			kb, err := strconv.ParseInt(string(bytes.TrimSuffix(bytes.TrimSpace(v), []byte(" kB"))), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/PID/status", field)
}
