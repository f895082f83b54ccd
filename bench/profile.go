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

	"github.com/google/pprof/profile"
)

// profileModule takes a CPU profile of plain Caddy and then of the module
// under the profiled workload, and returns the profileViews of the
// module's and the addedViews of what the module adds to a request.
func profileModule(ctx context.Context, cfg config, insts []*instance, wls []workload, dir string) (string, error) {
	w, ok := findWorkload(wls, profiledWorkload)
	if !ok {
		return "", fmt.Errorf("no %s workload", profiledWorkload)
	}
	var paths [2]string
	var served [2]float64
	for i, name := range []string{caddyName, moduleName} {
		inst, ok := findInstance(insts, name)
		if !ok {
			return "", fmt.Errorf("no %s target", name)
		}
		paths[i] = filepath.Join(dir, name+".pprof")
		var err error
		if served[i], err = profileUnderLoad(ctx, cfg, inst, w, paths[i]); err != nil {
			return "", err
		}
	}
	added := filepath.Join(dir, "added.pprof")
	if err := perRequestDiff(paths[1], served[1], paths[0], served[0], added); err != nil {
		return "", err
	}
	var views []string
	for _, v := range profileViews {
		out, err := pprofView(ctx, cfg, v, paths[1])
		if err != nil {
			return "", err
		}
		views = append(views, out)
	}
	for _, v := range addedViews {
		out, err := pprofView(ctx, cfg, v, added)
		if err != nil {
			return "", err
		}
		views = append(views, out)
	}
	return strings.Join(views, "\n"), nil
}

// profileViews are the views of the module's profile in the report: this
// module's own functions, each with what it calls (reverse_proxy under
// Forward), then the busiest functions of the whole process.
var profileViews = [][]string{
	{"-top", "-cum", "-show=caddy-vigthoria", "-nodecount=25"},
	{"-top", "-nodecount=20"},
}

// addedViews are the views of the difference: the functions whose CPU
// time per request grew the most with the module, and those that shrank.
var addedViews = [][]string{
	{"-top", "-nodecount=25"},
}

// pprofView runs go tool pprof with a view's arguments on a profile.
func pprofView(ctx context.Context, cfg config, view []string, path string) (string, error) {
	args := append([]string{"tool", "pprof"}, view...)
	out, err := exec.CommandContext(ctx, cfg.goCmd, append(args, cfg.caddy, path)...).Output()
	if err != nil {
		return "", fmt.Errorf("go tool pprof: %w", err)
	}
	return "$ go tool pprof " + strings.Join(view, " ") + " " + filepath.Base(path) + "\n" + string(out), nil
}

// profileUnderLoad saves a CPU profile of inst to path while w runs on it,
// and returns how many requests it answered in the profiled time.
func profileUnderLoad(ctx context.Context, cfg config, inst *instance, w workload, path string) (float64, error) {
	type ran struct {
		s   sample
		err error
	}
	loaded := make(chan ran, 1)
	go func() {
		s, err := w.run(ctx, inst, cfg.profile+time.Second)
		loaded <- ran{s, err}
	}()
	// Half a second in, once every connection is busy.
	time.Sleep(500 * time.Millisecond)
	err := fetchProfile(ctx, inst.caddy.adminURL, cfg.profile, path)
	r := <-loaded
	if err == nil {
		err = r.err
	}
	if err != nil {
		return 0, err
	}
	if r.s.ok == 0 {
		return 0, fmt.Errorf("%s answered no request while profiled", inst.name)
	}
	return r.s.rate * cfg.profile.Seconds(), nil
}

// perRequestDiff writes the profile of what a request costs more in the
// first profile than in the base one: each profile's CPU time divided by
// the requests answered while it was taken, then the base's subtracted.
// Plain pprof -diff_base would compare whole profiles, and a target that
// answers fewer requests in the same time would seem to cost nothing more.
func perRequestDiff(path string, requests float64, basePath string, baseRequests float64, out string) error {
	p, err := readProfile(path)
	if err != nil {
		return err
	}
	base, err := readProfile(basePath)
	if err != nil {
		return err
	}
	p.Scale(1 / requests)
	base.Scale(-1 / baseRequests)
	diff, err := profile.Merge([]*profile.Profile{p, base})
	if err != nil {
		return fmt.Errorf("merging profiles: %w", err)
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if err := diff.Write(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func readProfile(path string) (*profile.Profile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return profile.Parse(f)
}

func findInstance(insts []*instance, name string) (*instance, bool) {
	for _, inst := range insts {
		if inst.name == name {
			return inst, true
		}
	}
	return nil, false
}

func findWorkload(wls []workload, name string) (workload, bool) {
	for _, w := range wls {
		if w.name == name {
			return w, true
		}
	}
	return workload{}, false
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
