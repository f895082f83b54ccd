package policy

import (
	"path"
	"strings"
	"testing"
)

// TestMatchModel: the one rule of model globs. '*' is any run of
// characters, '/' included; the rest is path.Match's syntax.
func TestMatchModel(t *testing.T) {
	for _, tc := range []struct {
		glob, name string
		want       bool
	}{
		{"*", "vigthoria-fast-1", true},
		{"*", "org/model", true},
		{"*", "a/b/c", true},
		{"*", "", true},
		{"org/*", "org/model", true},
		{"org/*", "org/sub/model", true},
		{"org/*", "other/model", false},
		{"*/model", "org/model", true},
		{"vigthoria-fast-*", "vigthoria-fast-1", true},
		{"vigthoria-fast-*", "vigthoria-fast-", true},
		{"vigthoria-fast-*", "vigthoria-pro-1", false},
		{"vigthoria-*", "vigthoria-fast/1", true},
		{"*-1", "vigthoria-fast-1", true},
		{"*fast*", "vigthoria-fast-1", true},
		{"*a*b*c", "xxaxxbxxbxc", true},
		{"*a*b*c", "xxaxxbxxbx", false},
		{"vigthoria-fast-1", "vigthoria-fast-1", true},
		{"vigthoria-fast-1", "vigthoria-fast-10", false},
		{"vigthoria-fast-1", "Vigthoria-fast-1", false},
		{"vigthoria-fast-?", "vigthoria-fast-7", true},
		{"vigthoria-fast-?", "vigthoria-fast-17", false},
		{"org?model", "org/model", true},
		{"?", "é", true},
		{"gpt-[45]o", "gpt-4o", true},
		{"gpt-[45]o", "gpt-3o", false},
		{"gpt-[^45]o", "gpt-3o", true},
		{"gpt-[^45]o", "gpt-4o", false},
		{"v[0-9]", "v7", true},
		{"v[0-9]", "vx", false},
		{"v[a-cx-z]", "vy", true},
		{`a\*b`, "a*b", true},
		{`a\*b`, "axb", false},
		{`a[\]]b`, "a]b", true},
		{"", "", true},
		{"", "a", false},
		{"a", "", false},
	} {
		if got := MatchModel(tc.glob, tc.name); got != tc.want {
			t.Errorf("MatchModel(%q, %q) = %v, want %v", tc.glob, tc.name, got, tc.want)
		}
	}
}

// TestMatchModelAgreesWithPathMatch: on names without '/', the rule is
// path.Match's, so globs written for it keep their meaning.
func TestMatchModelAgreesWithPathMatch(t *testing.T) {
	globs := []string{"*", "a*", "*b", "a*b", "a?b", "[ab]*", "[^a]?", "a[b-d]e", `a\?`, "**", "*?*", "vigthoria-*-1"}
	names := []string{"", "a", "b", "ab", "acb", "aXb", "abe", "ace", "a?", "vigthoria-fast-1", "vigthoria-fast-2", "ba"}
	for _, g := range globs {
		for _, n := range names {
			want, _ := path.Match(g, n)
			if got := MatchModel(g, n); got != want {
				t.Errorf("MatchModel(%q, %q) = %v, path.Match says %v", g, n, got, want)
			}
		}
	}
}

func TestCheckGlob(t *testing.T) {
	for glob, ok := range map[string]bool{
		"*": true, "org/*": true, "v[0-9]": true, `a\*`: true, "[^a]": true, `[\]]`: true,
		"[": false, "[]": false, "[a": false, "[a-]": false, "[^]": false, `a\`: false, "[-a]": false,
	} {
		if err := CheckGlob(glob); (err == nil) != ok {
			t.Errorf("CheckGlob(%q) = %v, want ok %v", glob, err, ok)
		}
		if !ok && MatchModel(glob, strings.Trim(glob, `[]\^-`)) {
			t.Errorf("the malformed glob %q matches", glob)
		}
	}
}

// FuzzMatchModel: on globs and names without '/', the rule is
// path.Match's, byte for byte.
func FuzzMatchModel(f *testing.F) {
	for _, s := range [][2]string{{"vigthoria-*", "vigthoria-fast-1"}, {"[a-c]?*x", "bzzx"}, {`\*a`, "*a"}, {"*é", "aé"}, {"[^é]", "e"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, glob, name string) {
		if strings.Contains(glob+name, "/") {
			return
		}
		want, err := path.Match(glob, name)
		if CheckGlob(glob) != nil {
			if MatchModel(glob, name) {
				t.Errorf("the malformed glob %q matches %q", glob, name)
			}
			return
		}
		if err == nil && MatchModel(glob, name) != want {
			t.Errorf("MatchModel(%q, %q) = %v, path.Match says %v", glob, name, !want, want)
		}
	})
}

func BenchmarkMatchModel(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if !MatchModel("vigthoria-fast-*", "vigthoria-fast-1") || MatchModel("*-embed-*", "vigthoria-fast-1") {
			b.Fatal("wrong match")
		}
	}
}
