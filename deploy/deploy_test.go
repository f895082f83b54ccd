// Package deploy_test checks the deployment files: the Dockerfile at the
// root of the tree, and compose.yaml, Caddyfile and caddy-vigthoria.service
// here. No container builder is needed: the Dockerfile's build step runs
// as it would in caddy:builder (its xcaddy command, from this tree), and
// the binary it makes validates the deploy Caddyfile.
package deploy_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/vigthoria/caddy-vigthoria"
	"github.com/vigthoria/caddy-vigthoria/internal/harness"
)

const modulePath = "github.com/vigthoria/caddy-vigthoria"

// instruction is one Dockerfile instruction, its continuation lines joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, COPY, …
	args string
}

func dockerfile(t *testing.T) []instruction {
	t.Helper()
	f, err := os.Open("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []instruction
	var cur string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasSuffix(line, `\`) {
			cur += strings.TrimSuffix(line, `\`) + " "
			continue
		}
		cur += line
		cmd, args, _ := strings.Cut(cur, " ")
		out = append(out, instruction{strings.ToUpper(cmd), strings.Join(strings.Fields(args), " ")})
		cur = ""
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// caddyVersion is xcaddy.json's caddy_version, the build's one pin.
func caddyVersion(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile("../xcaddy.json")
	if err != nil {
		t.Fatal(err)
	}
	var b struct {
		CaddyVersion string `json:"caddy_version"`
	}
	if err := json.Unmarshal(raw, &b); err != nil || b.CaddyVersion == "" {
		t.Fatalf("xcaddy.json: caddy_version %q, %v", b.CaddyVersion, err)
	}
	return b.CaddyVersion
}

// xcaddyArgs returns the arguments of the Dockerfile's "xcaddy build", its
// ${CADDY_VERSION} expanded.
func xcaddyArgs(t *testing.T, ins []instruction, version string) []string {
	t.Helper()
	for _, in := range ins {
		if in.cmd == "RUN" && strings.HasPrefix(in.args, "xcaddy build ") {
			return strings.Fields(strings.ReplaceAll(in.args, "${CADDY_VERSION}", strings.TrimPrefix(version, "v")))[2:]
		}
	}
	t.Fatal("Dockerfile: no RUN xcaddy build")
	return nil
}

// TestDockerfile checks the Dockerfile against the tree: Caddy's version
// as in xcaddy.json in both stages, this module built from the copied
// source, every file it copies present and not left out of the build
// context, and a final stage that does not run as root.
func TestDockerfile(t *testing.T) {
	ins := dockerfile(t)
	version := caddyVersion(t)
	var froms, users []string
	var copied []string
	for _, in := range ins {
		switch in.cmd {
		case "ARG":
			if name, val, ok := strings.Cut(in.args, "="); ok && name == "CADDY_VERSION" && "v"+val != version {
				t.Errorf("Dockerfile: ARG CADDY_VERSION=%s, xcaddy.json has %s", val, version)
			}
		case "FROM":
			froms = append(froms, in.args)
		case "USER":
			users = append(users, in.args)
		case "COPY":
			args := strings.Fields(in.args)
			if strings.HasPrefix(args[0], "--from=") {
				continue
			}
			copied = append(copied, args[:len(args)-1]...)
		}
	}
	wantFroms := []string{"caddy:${CADDY_VERSION}-builder AS builder", "caddy:${CADDY_VERSION}"}
	if !slices.Equal(froms, wantFroms) {
		t.Errorf("Dockerfile stages %q, want %q", froms, wantFroms)
	}
	if len(users) == 0 || users[len(users)-1] == "root" || users[len(users)-1] == "0" {
		t.Errorf("Dockerfile: USER %q; the final stage must not run as root", users)
	}

	ignored := dockerignore(t)
	for _, src := range copied {
		if src == "." {
			continue
		}
		if _, err := os.Stat(filepath.Join("..", src)); err != nil {
			t.Errorf("Dockerfile copies %s: %v", src, err)
		}
		if ignored(src) {
			t.Errorf("Dockerfile copies %s, which .dockerignore leaves out", src)
		}
	}
	// What the build needs must reach it through COPY . .
	for _, need := range []string{"go.mod", "go.sum", "module.go", "deploy/Caddyfile", "dashboard/static", "limiter/redis_lib.lua"} {
		if ignored(need) {
			t.Errorf(".dockerignore leaves out %s, which the build needs", need)
		}
	}

	args := xcaddyArgs(t, ins, version)
	if args[0] != version {
		t.Errorf("xcaddy builds Caddy %s, xcaddy.json pins %s", args[0], version)
	}
	with := slices.Index(args, "--with")
	if with < 0 || with+1 >= len(args) || !regexp.MustCompile(`^`+regexp.QuoteMeta(modulePath)+`(@v[^=]+)?=\.$`).MatchString(args[with+1]) {
		t.Errorf("xcaddy %q: want --with %s[@version]=. (this tree)", args, modulePath)
	}
}

// dockerignore returns whether .dockerignore leaves a path out of the
// build context (the patterns it uses: names and globs, no exceptions).
func dockerignore(t *testing.T) func(string) bool {
	t.Helper()
	raw, err := os.ReadFile("../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	var patterns []string
	for _, line := range strings.Split(string(raw), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			if strings.HasPrefix(line, "!") {
				t.Fatalf(".dockerignore: exception %q; teach this test about it", line)
			}
			patterns = append(patterns, line)
		}
	}
	return func(path string) bool {
		for p := path; p != "." && p != "/"; p = filepath.Dir(p) {
			for _, pat := range patterns {
				if ok, _ := filepath.Match(pat, p); ok {
					return true
				}
			}
		}
		return false
	}
}

// TestDockerBuild runs the Dockerfile's build step as caddy:builder
// would: its xcaddy command, from the root of this tree. The binary
// holds the module and serves the deploy Caddyfile, with the default
// store where the image's data directory puts it.
func TestDockerBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds Caddy with xcaddy")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to build with")
	}
	dir := t.TempDir()
	xcaddy := filepath.Join(dir, "xcaddy")
	run(t, "..", nil, goBin, "build", "-o", xcaddy, "github.com/caddyserver/xcaddy/cmd/xcaddy")

	args := xcaddyArgs(t, dockerfile(t), caddyVersion(t))
	out := slices.Index(args, "--output")
	if out < 0 || out+1 >= len(args) || args[out+1] != "/usr/bin/caddy" {
		t.Fatalf("xcaddy %q: want --output /usr/bin/caddy, which the final stage copies", args)
	}
	bin := filepath.Join(dir, "caddy")
	args[out+1] = bin
	run(t, "..", nil, xcaddy, append([]string{"build"}, args...)...)

	if mods := run(t, dir, nil, bin, "list-modules"); !strings.Contains(mods, "\nhttp.handlers.vigthoria\n") {
		t.Errorf("the built Caddy's modules lack http.handlers.vigthoria:\n%s", mods)
	}

	// The binary serves the deploy Caddyfile in the image's environment
	// (XDG_DATA_HOME=/data, here a directory of the test's), on free
	// ports: the default store is made where the image's volume is.
	data := filepath.Join(dir, "data")
	port, admin := harness.FreePort(t), harness.FreePort(t)
	site := fmt.Sprintf("http://127.0.0.1:%d", port)
	caddyfilePath, err := filepath.Abs("Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	env := []string{
		"XDG_DATA_HOME=" + data, "XDG_CONFIG_HOME=" + filepath.Join(dir, "config"), "HOME=" + dir,
		"VIGTHORIA_API_KEY=sk-test-deploy", "SITE_ADDRESS=" + site, fmt.Sprintf("CADDY_ADMIN=127.0.0.1:%d", admin),
	}
	run(t, dir, env, bin, "validate", "--adapter", "caddyfile", "--config", caddyfilePath)
	cmd := exec.Command(bin, "run", "--adapter", "caddyfile", "--config", caddyfilePath)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	logPath := filepath.Join(dir, "caddy.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	log := func() string { return readString(t, logPath) }
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	}()
	var res *http.Response
	for deadline := time.Now().Add(30 * time.Second); ; {
		res, err = http.Get(site + "/v1/models")
		if err == nil {
			res.Body.Close()
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("caddy run exited: %v\n%s", err, log())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy run did not serve within 30s:\n%s", log())
		}
	}
	if res.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /v1/models without a key: %s, want 401", res.Status)
	}
	db := filepath.Join(data, "caddy", "vigthoria", "vigthoria.db")
	if _, err := os.Stat(db); err != nil {
		t.Errorf("the default store is not at <XDG_DATA_HOME>/caddy/vigthoria/vigthoria.db: %v", err)
	}
	if strings.Contains(log(), "sk-test-deploy") || !strings.Contains(log(), `"status":401`) {
		t.Errorf("Caddy's log holds the server key, or not the access log line of the 401:\n%s", log())
	}
}

// run runs a command in dir with env added to the test's, and returns its
// output; it fails the test if the command fails.
func run(t *testing.T, dir string, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestCaddyfile checks the deploy Caddyfile: caddy fmt-clean, adapted
// without warnings with its defaults and with the compose file's Redis
// store, and the server key left a placeholder in the JSON.
func TestCaddyfile(t *testing.T) {
	raw, err := os.ReadFile("Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	if formatted := caddyfile.Format(raw); string(formatted) != string(raw) {
		t.Errorf("deploy/Caddyfile is not caddy fmt-clean; caddy fmt makes it:\n%s", formatted)
	}
	compose, err := os.ReadFile("compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s+VIGTHORIA_STORE: (.+)$`).FindSubmatch(compose)
	if m == nil {
		t.Fatal("compose.yaml sets no VIGTHORIA_STORE")
	}
	for _, c := range []struct {
		name, store, want string
	}{
		{"default", "", ""}, // the default store: Provision fills it in
		{"compose", string(m[1]), "redis://redis:6379/0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Setenv("VIGTHORIA_STORE", c.store)
			if c.store == "" {
				os.Unsetenv("VIGTHORIA_STORE")
			}
			t.Setenv("VIGTHORIA_API_KEY", "sk-must-not-appear")
			cfg, warnings, err := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}.Adapt(raw, map[string]any{"filename": "Caddyfile"})
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			if len(warnings) > 0 {
				t.Errorf("adapting warned: %v", warnings)
			}
			h := vigthoriaHandler(t, cfg)
			if h["store"] != nil && h["store"] != c.want || h["store"] == nil && c.want != "" {
				t.Errorf("store %v, want %q", h["store"], c.want)
			}
			if h["api_key"] != "{env.VIGTHORIA_API_KEY}" || strings.Contains(string(cfg), "sk-must-not-appear") {
				t.Errorf("api_key %v: want the placeholder, never the key", h["api_key"])
			}
		})
	}
}

// vigthoriaHandler finds the vigthoria handler in an adapted config.
func vigthoriaHandler(t *testing.T, cfg []byte) map[string]any {
	t.Helper()
	var found map[string]any
	var walk func(any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if v["handler"] == "vigthoria" {
				found = v
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	var root any
	if err := json.Unmarshal(cfg, &root); err != nil {
		t.Fatal(err)
	}
	walk(root)
	if found == nil {
		t.Fatalf("no vigthoria handler in %s", cfg)
	}
	return found
}

// TestCompose checks what compose.yaml refers to: the build context
// holding the Dockerfile and the Caddyfile it mounts.
func TestCompose(t *testing.T) {
	raw, err := os.ReadFile("compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	text := string(raw)
	if m := regexp.MustCompile(`(?m)^\s+context: (\S+)$`).FindStringSubmatch(text); m == nil {
		t.Error("compose.yaml: no build context")
	} else if _, err := os.Stat(filepath.Join(m[1], "Dockerfile")); err != nil {
		t.Errorf("compose.yaml: build context %s: %v", m[1], err)
	}
	mounts := regexp.MustCompile(`(?m)^\s+- (\./[^:]+):(/[^:]+)`).FindAllStringSubmatch(text, -1)
	var caddyfileMounted bool
	for _, m := range mounts {
		if _, err := os.Stat(m[1]); err != nil {
			t.Errorf("compose.yaml mounts %s: %v", m[1], err)
		}
		caddyfileMounted = caddyfileMounted || m[1] == "./Caddyfile" && m[2] == "/etc/caddy/Caddyfile"
	}
	if !caddyfileMounted {
		t.Error("compose.yaml does not mount ./Caddyfile at /etc/caddy/Caddyfile")
	}
	for _, want := range []string{"caddy_data:/data", "VIGTHORIA_API_KEY: ${VIGTHORIA_API_KEY:?"} {
		if !strings.Contains(text, want) {
			t.Errorf("compose.yaml lacks %q", want)
		}
	}
}

// unit reads a systemd unit file: section → key → values, in order.
func unit(t *testing.T, path string) map[string]map[string][]string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sections := make(map[string]map[string][]string)
	var section string
	for i, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			sections[section] = make(map[string][]string)
		default:
			key, val, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not a key=value in a section: %q", path, i+1, line)
			}
			sections[section][key] = append(sections[section][key], val)
		}
	}
	return sections
}

// TestUnit checks the systemd unit: Caddy runs as the caddy user with its
// data directory in the unit's state directory, where the CLI run as that
// user (sudo -u caddy, which sets HOME to the user's home and no
// XDG_DATA_HOME) finds the same default store; the server key comes from
// an environment file and is never printed. systemd-analyze verifies it
// where it is installed.
func TestUnit(t *testing.T) {
	const path = "caddy-vigthoria.service"
	u := unit(t, path)
	svc := u["Service"]
	one := func(key string) string {
		t.Helper()
		if len(svc[key]) != 1 {
			t.Errorf("%s: %s = %q, want one value", path, key, svc[key])
			return ""
		}
		return svc[key][0]
	}
	if one("User") != "caddy" || one("Group") != "caddy" {
		t.Errorf("%s: User %q Group %q, want caddy", path, svc["User"], svc["Group"])
	}
	if one("EnvironmentFile") == "" {
		t.Errorf("%s: no EnvironmentFile for VIGTHORIA_API_KEY", path)
	}
	start := one("ExecStart")
	if !strings.HasPrefix(start, "/usr/bin/caddy run ") || !strings.Contains(start, "--config /etc/caddy/Caddyfile") || strings.Contains(start, "--environ") {
		t.Errorf("%s: ExecStart %q: want /usr/bin/caddy run --config /etc/caddy/Caddyfile, without --environ (it prints the server key)", path, start)
	}
	if len(u["Install"]["WantedBy"]) == 0 {
		t.Errorf("%s: no WantedBy; systemctl enable would do nothing", path)
	}

	env := make(map[string]string)
	for _, e := range svc["Environment"] {
		for _, kv := range strings.Fields(e) {
			k, v, _ := strings.Cut(kv, "=")
			env[k] = v
		}
	}
	state := "/var/lib/" + one("StateDirectory")
	if !slices.Contains(svc["ReadWritePaths"], state) {
		t.Errorf("%s: ReadWritePaths %q lacks the state directory %s", path, svc["ReadWritePaths"], state)
	}
	home := regexp.MustCompile(`--home-dir (\S+)`).FindStringSubmatch(readString(t, path))
	if home == nil || home[1] != state {
		t.Fatalf("%s: the useradd it shows must give the caddy user the home %s", path, state)
	}
	data := env["XDG_DATA_HOME"]
	if !strings.HasPrefix(data, state+"/") {
		t.Errorf("%s: XDG_DATA_HOME %q is outside the state directory %s", path, data, state)
	}
	// The data directory of the service, and of the CLI as the caddy user.
	t.Setenv("XDG_DATA_HOME", data)
	service := caddy.AppDataDir()
	os.Unsetenv("XDG_DATA_HOME")
	t.Setenv("HOME", home[1])
	if cli := caddy.AppDataDir(); cli != service {
		t.Errorf("the service's data directory is %s, the CLI's as the caddy user %s", service, cli)
	}
	store := filepath.Join(service, "vigthoria", "vigthoria.db")
	if !strings.Contains(readString(t, path), store) || !strings.Contains(readString(t, "../docs/deploy.md"), store) {
		t.Errorf("%s and docs/deploy.md should name the default store, %s", path, store)
	}

	verify, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("no systemd-analyze: the unit is not verified by systemd")
		return
	}
	// systemd-analyze verify wants the executables to exist: the copy it
	// verifies runs this test's binary in Caddy's place.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cp := filepath.Join(t.TempDir(), path)
	if err := os.WriteFile(cp, []byte(strings.ReplaceAll(readString(t, path), "/usr/bin/caddy", self)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(verify, "verify", cp).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func readString(t *testing.T, path string) string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}
