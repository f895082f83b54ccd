package vigthoria

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/vigthoria/caddy-vigthoria/dashboard"
)

// docFiles are the documents whose examples and links are checked: the
// README and every page of docs/.
func docFiles(t *testing.T) []string {
	t.Helper()
	pages, err := filepath.Glob("docs/*.md")
	if err != nil || len(pages) == 0 {
		t.Fatalf("no pages in docs/: %v", err)
	}
	return append([]string{"README.md"}, pages...)
}

// A docBlock is one fenced code block of a document.
type docBlock struct {
	file string
	line int // of the opening fence
	lang string
	body string
}

func (b docBlock) String() string { return fmt.Sprintf("%s:%d (%s)", b.file, b.line, b.lang) }

// fencedBlocks returns the fenced code blocks of a Markdown file.
func fencedBlocks(t *testing.T, file string) []docBlock {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var blocks []docBlock
	var open *docBlock
	for i, line := range strings.Split(string(raw), "\n") {
		switch {
		case open == nil && strings.HasPrefix(line, "```"):
			open = &docBlock{file: file, line: i + 1, lang: strings.TrimSpace(strings.TrimPrefix(line, "```"))}
		case open != nil && line == "```":
			blocks = append(blocks, *open)
			open = nil
		case open != nil:
			open.body += line + "\n"
		}
	}
	if open != nil {
		t.Fatalf("%s: the block opened at line %d is never closed", file, open.line)
	}
	return blocks
}

// TestDocExamples keeps every Caddyfile and JSON example of the README and
// docs/ true as the module changes: a Caddyfile adapts without error or
// warning and is caddy fmt-clean (else every start with it warns); a JSON
// block parses, and one that is a vigthoria or vigthoria_dashboard handler
// config loads into the handler, unknown fields refused. With -update, it
// rewrites each Caddyfile block as caddy fmt would.
func TestDocExamples(t *testing.T) {
	counts := map[string]int{}
	for _, file := range docFiles(t) {
		for _, b := range fencedBlocks(t, file) {
			if b.lang != strings.ToLower(b.lang) && (strings.EqualFold(b.lang, "caddyfile") || strings.EqualFold(b.lang, "json")) {
				t.Errorf("%s: write the fence in lowercase, else the block goes unchecked", b)
			}
			switch b.lang {
			case "caddyfile":
				counts[b.lang]++
				if formatted := string(caddyfile.Format([]byte(b.body))); formatted != b.body {
					if *update {
						rewriteBlock(t, b, formatted)
						continue
					}
					t.Errorf("%s is not caddy fmt-clean (go test -run TestDocExamples -update . rewrites it); formatted it reads:\n%s", b, formatted)
				}
				_, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(b.body), nil)
				if err != nil {
					t.Errorf("%s does not adapt: %v", b, err)
				}
				for _, w := range warnings {
					t.Errorf("%s adapts with a warning: %s", b, w.String())
				}
			case "json":
				counts[b.lang]++
				checkJSONExample(t, b)
			}
		}
	}
	if counts["caddyfile"] == 0 || counts["json"] == 0 {
		t.Errorf("found %d Caddyfile and %d JSON examples; the extraction is broken", counts["caddyfile"], counts["json"])
	}
}

// rewriteBlock replaces the body of block b in its file with body.
func rewriteBlock(t *testing.T, b docBlock, body string) {
	t.Helper()
	raw, err := os.ReadFile(b.file)
	if err != nil {
		t.Fatal(err)
	}
	fence := "```" + b.lang + "\n"
	old := fence + b.body + "```\n"
	if strings.Count(string(raw), old) != 1 {
		t.Fatalf("%s: cannot find the block once to rewrite it", b)
	}
	out := strings.Replace(string(raw), old, fence+body+"```\n", 1)
	if err := os.WriteFile(b.file, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
}

func checkJSONExample(t *testing.T, b docBlock) {
	t.Helper()
	if !json.Valid([]byte(b.body)) {
		var v any
		t.Errorf("%s is not valid JSON: %v", b, json.Unmarshal([]byte(b.body), &v))
		return
	}
	var head struct {
		Handler string `json:"handler"`
	}
	if json.Unmarshal([]byte(b.body), &head) != nil {
		return // an array or a scalar: not a handler config
	}
	// The handler's own fields, without the name Caddy routes it by.
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(b.body), &fields); err != nil {
		t.Fatal(err)
	}
	delete(fields, "handler")
	body, err := json.Marshal(fields)
	if err != nil {
		t.Fatal(err)
	}
	var target any
	switch head.Handler {
	case "vigthoria":
		target = new(Handler)
	case "vigthoria_dashboard":
		target = new(dashboard.Handler)
	default:
		return
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(target); err != nil {
		t.Errorf("%s does not load into the %s handler: %v", b, head.Handler, err)
	}
}

var (
	mdLink  = regexp.MustCompile(`\]\(([^)\s]+)\)`)
	heading = regexp.MustCompile("(?m)^#{1,6} (.+)$")
)

// anchor is the id GitHub gives a heading: lowercase, punctuation but
// hyphens and underscores dropped, spaces made hyphens.
func anchor(title string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(title) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r > 127:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// TestDocLinks checks that every relative link of the README and docs/
// names a file that exists and, with a fragment into a Markdown file, one
// of its headings.
func TestDocLinks(t *testing.T) {
	anchors := map[string]map[string]bool{}
	anchorsOf := func(file string) map[string]bool {
		if a, ok := anchors[file]; ok {
			return a
		}
		a := map[string]bool{}
		if raw, err := os.ReadFile(file); err == nil {
			for _, m := range heading.FindAllStringSubmatch(string(raw), -1) {
				a[anchor(m[1])] = true
			}
		}
		anchors[file] = a
		return a
	}
	for _, file := range docFiles(t) {
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range mdLink.FindAllStringSubmatch(string(raw), -1) {
			link := m[1]
			if strings.Contains(link, "://") || strings.HasPrefix(link, "mailto:") {
				continue
			}
			path, frag, _ := strings.Cut(link, "#")
			target := file
			if path != "" {
				target = filepath.Join(filepath.Dir(file), path)
				if _, err := os.Stat(target); err != nil {
					t.Errorf("%s links to %s, which does not exist", file, link)
					continue
				}
			}
			if frag != "" && strings.HasSuffix(target, ".md") && !anchorsOf(target)[frag] {
				t.Errorf("%s links to %s, but %s has no heading #%s", file, link, target, frag)
			}
		}
	}
}
