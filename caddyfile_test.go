package vigthoria

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

var update = flag.Bool("update", false, "rewrite the golden files of testdata/caddyfile")

// separator splits a golden file into the Caddyfile and what adapting it
// must give: the JSON config, or "error: <message>".
const separator = "----------\n"

// TestCaddyfileAdapt adapts each testdata/caddyfile/*.caddyfiletest and
// compares the result with the golden JSON or error below its separator.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile/*.caddyfiletest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files found: %v", err)
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".caddyfiletest"), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			input, want, ok := strings.Cut(string(raw), separator)
			if !ok {
				t.Fatalf("%s has no separator line", file)
			}
			got := adapt(t, input)
			if *update {
				if err := os.WriteFile(file, []byte(input+separator+got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if got != want {
				t.Errorf("adapting %s\ngot:\n%s\nwant:\n%s", file, got, want)
			}
		})
	}
}

func adapt(t *testing.T, caddyfile string) string {
	t.Helper()
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		return "error: " + err.Error() + "\n"
	}
	if len(warnings) > 0 {
		t.Errorf("unexpected warnings: %v", warnings)
	}
	var out bytes.Buffer
	if err := json.Indent(&out, cfg, "", "\t"); err != nil {
		t.Fatal(err)
	}
	return out.String() + "\n"
}

// TestExampleCaddyfileAdapts keeps Caddyfile.example, which make run uses
// with a real key, valid as the syntax changes.
func TestExampleCaddyfileAdapts(t *testing.T) {
	raw, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	if got := adapt(t, string(raw)); strings.HasPrefix(got, "error: ") || !strings.Contains(got, `"idle_timeout"`) {
		t.Errorf("Caddyfile.example adapts to %s", got)
	}
}
