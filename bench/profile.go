package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// profileModule takes a CPU profile of the module's Caddy while the
// profiled workload runs on it, and returns the profileViews of it.
func profileModule(ctx context.Context, cfg config, insts []*instance, wls []workload, dir string) (string, error) {
	inst, w, err := profiled(insts, wls)
	if err != nil {
		return "", err
	}
	loaded := make(chan error, 1)
	go func() {
		_, err := w.run(ctx, inst, cfg.profile+time.Second)
		loaded <- err
	}()
	path := filepath.Join(dir, moduleName+".pprof")
	// Half a second in, once every connection is busy.
	time.Sleep(500 * time.Millisecond)
	err = fetchProfile(ctx, inst.caddy.adminURL, cfg.profile, path)
	if loadErr := <-loaded; err == nil {
		err = loadErr
	}
	if err != nil {
		return "", err
	}
	var views []string
	for _, view := range profileViews {
		args := append([]string{"tool", "pprof"}, view...)
		out, err := exec.CommandContext(ctx, cfg.goCmd, append(args, cfg.caddy, path)...).Output()
		if err != nil {
			return "", fmt.Errorf("go tool pprof: %w", err)
		}
		views = append(views, "$ go tool pprof "+strings.Join(view, " ")+"\n"+string(out))
	}
	return strings.Join(views, "\n"), nil
}

// profileViews are the views of the profile in the report: this module's
// own functions, each with what it calls (reverse_proxy under Forward),
// then the busiest functions of the whole process.
var profileViews = [][]string{
	{"-top", "-cum", "-show=caddy-vigthoria", "-nodecount=25"},
	{"-top", "-nodecount=20"},
}

// profiled finds the module's instance and the profiled workload.
func profiled(insts []*instance, wls []workload) (*instance, workload, error) {
	for _, inst := range insts {
		if inst.name != moduleName {
			continue
		}
		for _, w := range wls {
			if w.name == profiledWorkload {
				return inst, w, nil
			}
		}
	}
	return nil, workload{}, fmt.Errorf("no %s target or %s workload", moduleName, profiledWorkload)
}

// fetchProfile saves a CPU profile of d from Caddy's admin endpoint to path.
func fetchProfile(ctx context.Context, adminURL string, d time.Duration, path string) error {
	url := fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", adminURL, int(d.Seconds()))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, res.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, res.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
