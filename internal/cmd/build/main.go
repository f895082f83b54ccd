// Command build builds ./caddy with xcaddy from xcaddy.json, the single
// source of truth for the build: the JSON shape of xcaddy's own Builder
// (caddy_version, plugins, replacements). A replacement whose new path is
// relative is taken relative to xcaddy.json, so the module replaced by "."
// is this working tree.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/caddyserver/xcaddy"
)

func main() {
	config := flag.String("config", "xcaddy.json", "build description in xcaddy's Builder JSON shape")
	output := flag.String("o", "caddy", "binary to write")
	flag.Parse()
	if err := build(*config, *output); err != nil {
		fmt.Fprintln(os.Stderr, "build:", err)
		os.Exit(1)
	}
}

func build(config, output string) error {
	raw, err := os.ReadFile(config)
	if err != nil {
		return err
	}
	var b xcaddy.Builder
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return fmt.Errorf("reading %s: %w", config, err)
	}
	if b.CaddyVersion == "" {
		return fmt.Errorf("%s: caddy_version is required", config)
	}
	base, err := filepath.Abs(filepath.Dir(config))
	if err != nil {
		return err
	}
	local := make(map[string]bool)
	for i, r := range b.Replacements {
		if p := string(r.New); strings.HasPrefix(p, ".") || filepath.IsAbs(p) {
			b.Replacements[i].New = xcaddy.ReplacementPath(filepath.Join(base, p))
			local[string(r.Old)] = true
		}
	}
	// A plugin replaced by a local directory has no published version to
	// look up; the zero pseudo-version lets "go get" take the directory
	// without asking the module proxy about it.
	for i, p := range b.Plugins {
		if p.Version == "" && local[p.PackagePath] {
			b.Plugins[i].Version = "v0.0.0-00010101000000-000000000000"
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	return b.Build(ctx, output)
}
