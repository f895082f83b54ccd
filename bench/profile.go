package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/pprof/profile"
)

// profileModule takes a CPU profile of plain Caddy and then of the module
// under the profiled workload. It returns the profileViews of the
// module's, and a Markdown comparison of the two per request.
func profileModule(ctx context.Context, cfg config, insts []*instance, wls []workload, dir string) (views, table string, err error) {
	w, ok := findWorkload(wls, profiledWorkload)
	if !ok {
		return "", "", fmt.Errorf("no %s workload", profiledWorkload)
	}
	var profiles [2]perRequest
	var modulePath string
	if cfg.profiles != "" {
		if err := os.MkdirAll(cfg.profiles, 0o755); err != nil {
			return "", "", err
		}
		dir = cfg.profiles
	}
	for i, name := range []string{caddyName, moduleName} {
		inst, ok := findInstance(insts, name)
		if !ok {
			return "", "", fmt.Errorf("no %s target", name)
		}
		path := filepath.Join(dir, name+".pprof")
		served, err := profileUnderLoad(ctx, cfg, inst, w, path)
		if err != nil {
			return "", "", err
		}
		if profiles[i], err = readPerRequest(path, served); err != nil {
			return "", "", err
		}
		modulePath = path
	}
	var out []string
	for _, view := range profileViews {
		args := append([]string{"tool", "pprof"}, view...)
		text, err := exec.CommandContext(ctx, cfg.goCmd, append(args, cfg.caddy, modulePath)...).Output()
		if err != nil {
			return "", "", fmt.Errorf("go tool pprof: %w", err)
		}
		out = append(out, "$ go tool pprof "+strings.Join(view, " ")+"\n"+string(text))
	}
	return strings.Join(out, "\n"), compare(profiles[0], profiles[1]), nil
}

// profileViews are the views of the module's profile in the report: this
// module's own functions, each with what it calls (reverse_proxy under
// Forward), then the busiest functions of the whole process.
var profileViews = [][]string{
	{"-top", "-cum", "-show=caddy-vigthoria", "-nodecount=25"},
	{"-top", "-nodecount=20"},
}

// The functions whose time per request the comparison shows: where a
// request's CPU time goes in both Caddys.
const moduleHandler = "github.com/vigthoria/caddy-vigthoria.(*Handler).ServeHTTP"

var comparedFunctions = []struct{ name, about string }{
	{"net/http.(*conn).serve", "the client's connection: reading the request, handling it, writing the answer"},
	{"net/http.(*conn).readRequest", "reading the client's request"},
	{"github.com/caddyserver/caddy/v2/modules/caddyhttp.(*Server).ServeHTTP", "Caddy's handling, the handlers' included"},
	{"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy.(*Handler).ServeHTTP", "`reverse_proxy`"},
	{moduleHandler, "this module's handler, `reverse_proxy` included"},
	{"net/http.(*response).finishRequest", "writing the answer's headers and body out"},
	{"net/http.(*persistConn).writeLoop", "writing the request upstream"},
	{"net/http.(*persistConn).readLoop", "reading the upstream's answer"},
	{"runtime.mallocgc", "allocating, the GC's assists included"},
	{"runtime.gcBgMarkWorker", "the GC's background marking"},
}

// perRequest is a CPU profile as CPU time per request: each function's
// cumulative time, and the time of each function that moduleHandler calls.
type perRequest struct {
	total    float64            // ns
	cum      map[string]float64 // ns, by function
	children map[string]float64 // ns, by function called from moduleHandler
}

func readPerRequest(path string, requests float64) (perRequest, error) {
	f, err := os.Open(path)
	if err != nil {
		return perRequest{}, err
	}
	defer f.Close()
	p, err := profile.Parse(f)
	if err != nil {
		return perRequest{}, err
	}
	value := -1
	for i, st := range p.SampleType {
		if st.Type == "cpu" {
			value = i
		}
	}
	if value < 0 {
		return perRequest{}, fmt.Errorf("%s has no CPU time", path)
	}
	pr := perRequest{cum: map[string]float64{}, children: map[string]float64{}}
	var stack []string
	for _, s := range p.Sample {
		v := float64(s.Value[value]) / requests
		pr.total += v
		stack = stack[:0] // leaf first; inlined frames before their callers
		for _, loc := range s.Location {
			for _, line := range loc.Line {
				stack = append(stack, line.Function.Name)
			}
		}
		seen := map[string]bool{}
		for i, fn := range stack {
			if seen[fn] {
				continue // recursion counts once
			}
			seen[fn] = true
			pr.cum[fn] += v
			if fn == moduleHandler {
				child := "(itself)"
				if i > 0 {
					child = stack[i-1]
				}
				pr.children[child] += v
			}
		}
	}
	return pr, nil
}

// compare writes the two profiles' times per request side by side, then
// the module's own steps.
func compare(plain, mod perRequest) string {
	var b strings.Builder
	fmt.Fprintf(&b, "| function | what it is | plain Caddy | module | difference |\n|---|---|--:|--:|--:|\n")
	row := func(name, about string, a, m float64) {
		fmt.Fprintf(&b, "| %s | %s | %.1f µs | %.1f µs | %+.1f µs |\n", name, about, a/1e3, m/1e3, (m-a)/1e3)
	}
	row("all", "the whole process, background work included", plain.total, mod.total)
	for _, c := range comparedFunctions {
		row("`"+c.name+"`", c.about, plain.cum[c.name], mod.cum[c.name])
	}
	type step struct {
		name string
		ns   float64
	}
	var steps []step
	for name, ns := range mod.children {
		steps = append(steps, step{name, ns})
	}
	slices.SortFunc(steps, func(a, b step) int { return cmp.Compare(b.ns, a.ns) })
	fmt.Fprintf(&b, "\nWhat the module's handler calls, CPU time per request:\n\n| function | module |\n|---|--:|\n")
	for _, s := range steps {
		if s.ns >= 50 { // half a sample in 10 s of a few thousand requests a second is noise
			fmt.Fprintf(&b, "| `%s` | %.1f µs |\n", s.name, s.ns/1e3)
		}
	}
	return b.String()
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
