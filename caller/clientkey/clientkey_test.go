package clientkey

import (
	"hash/crc32"
	"regexp"
	"strings"
	"testing"
)

var secretShape = regexp.MustCompile(`^vgt_[0-9A-Za-z]{38}$`)

func TestNewIsValid(t *testing.T) {
	seen := make(map[string]bool)
	for range 1000 {
		s, err := New()
		if err != nil {
			t.Fatal(err)
		}
		if !secretShape.MatchString(s) {
			t.Fatalf("New() = %q, want vgt_ and 38 base62 characters", s)
		}
		if !Valid(s) {
			t.Fatalf("Valid(%q) = false for a new secret", s)
		}
		if seen[s] {
			t.Fatalf("New() repeated %q", s)
		}
		seen[s] = true
	}
}

// TestChecksumDefinition checks the last six characters against an
// independent reading of the format: the CRC32 (IEEE) of the 32 random
// characters, as a base62 number of six digits.
func TestChecksumDefinition(t *testing.T) {
	for range 100 {
		s, err := New()
		if err != nil {
			t.Fatal(err)
		}
		var got uint64
		for _, c := range s[36:] {
			got = got*62 + uint64(strings.IndexRune(base62, c))
		}
		if want := crc32.ChecksumIEEE([]byte(s[4:36])); got != uint64(want) {
			t.Fatalf("checksum of %q = %d, want the CRC32 of its body, %d", s, got, want)
		}
	}
}

func TestChecksum(t *testing.T) {
	for _, s := range []string{"", "a", "1234567", "12345678", "123456789", strings.Repeat("xyz", 40)} {
		if got, want := checksum(s), crc32.ChecksumIEEE([]byte(s)); got != want {
			t.Errorf("checksum(%q) = %08x, want %08x", s, got, want)
		}
	}
}

func TestNewIsUniform(t *testing.T) {
	counts := make(map[rune]int)
	const secrets = 2000
	for range secrets {
		s, err := New()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range s[4:36] {
			counts[c]++
		}
	}
	if len(counts) != 62 {
		t.Fatalf("%d distinct characters in the random part, want 62", len(counts))
	}
	// 1032 expected per character, standard deviation about 32: a
	// quarter off is far outside chance.
	want := secrets * 32 / 62
	for c, n := range counts {
		if n < want*3/4 || n > want*5/4 {
			t.Errorf("character %q appears %d times, want about %d", c, n, want)
		}
	}
}

func TestEverySingleCharacterChangeIsRejected(t *testing.T) {
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	for i := range len(s) {
		for c := range 256 {
			if byte(c) == s[i] {
				continue
			}
			m := s[:i] + string([]byte{byte(c)}) + s[i+1:]
			if Valid(m) {
				t.Errorf("Valid accepts %q, %q changed to %q at %d", m, s[i], byte(c), i)
			}
		}
	}
}

func TestValidRejects(t *testing.T) {
	valid, err := New()
	if err != nil {
		t.Fatal(err)
	}
	body := valid[4:36]
	var wrongSum [6]byte
	putChecksum(wrongSum[:], checksum(body)+1)
	tests := []struct {
		name, s string
	}{
		{"empty", ""},
		{"prefix only", "vgt_"},
		{"one short", valid[:len(valid)-1]},
		{"one long", valid + "0"},
		{"twice", valid + valid},
		{"uppercase prefix", "VGT_" + valid[4:]},
		{"other prefix", "vgk_" + valid[4:]},
		{"no underscore", "vgt-" + valid[4:]},
		{"openai style", "sk-" + valid[3:]},
		{"dash in body", valid[:10] + "-" + valid[11:]},
		{"space in body", valid[:10] + " " + valid[11:]},
		{"non-ASCII", valid[:40] + "é"},
		{"NUL", valid[:41] + "\x00"},
		{"wrong checksum", "vgt_" + body + string(wrongSum[:])},
		{"zero checksum", "vgt_" + body + "000000"},
		{"swapped halves", "vgt_" + body[16:] + body[:16] + valid[36:]},
		{"all zeros", "vgt_" + strings.Repeat("0", 38)},
		{"lowercased", strings.ToLower(valid)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.s == valid {
				t.Skip("the mutation left the key as it was")
			}
			if Valid(tt.s) {
				t.Errorf("Valid(%q) = true, want false", tt.s)
			}
		})
	}
}

func TestFromAuthorization(t *testing.T) {
	key, err := New()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		values []string
		want   string // "" for refused
	}{
		{"canonical", []string{"Bearer " + key}, key},
		{"lowercase scheme", []string{"bearer " + key}, key},
		{"uppercase scheme", []string{"BEARER " + key}, key},
		{"mixed case scheme", []string{"bEaReR " + key}, key},
		{"token68 padding", []string{"Bearer abc+/=="}, "abc+/=="},
		{"token68 punctuation", []string{"Bearer a-b.c_d~e"}, "a-b.c_d~e"},
		{"missing", nil, ""},
		{"empty list", []string{}, ""},
		{"empty header", []string{""}, ""},
		{"two headers", []string{"Bearer " + key, "Bearer " + key}, ""},
		{"two headers, first empty", []string{"", "Bearer " + key}, ""},
		{"scheme alone", []string{"Bearer"}, ""},
		{"scheme and space", []string{"Bearer "}, ""},
		{"two spaces", []string{"Bearer  " + key}, ""},
		{"tab", []string{"Bearer\t" + key}, ""},
		{"leading space", []string{" Bearer " + key}, ""},
		{"trailing space", []string{"Bearer " + key + " "}, ""},
		{"basic", []string{"Basic dXNlcjpwYXNz"}, ""},
		{"token scheme", []string{"Token " + key}, ""},
		{"no scheme", []string{key}, ""},
		{"scheme glued", []string{"Bearer" + key}, ""},
		{"longer scheme", []string{"Bearers " + key}, ""},
		{"token with a space", []string{"Bearer " + key[:10] + " " + key[10:]}, ""},
		{"two tokens", []string{"Bearer " + key + " " + key}, ""},
		{"quoted token", []string{`Bearer "` + key + `"`}, ""},
		{"comma list", []string{"Bearer " + key + ", Basic x"}, ""},
		{"only padding", []string{"Bearer =="}, ""},
		{"padding inside", []string{"Bearer ab=c"}, ""},
		{"control character", []string{"Bearer " + key + "\x00"}, ""},
		{"non-ASCII", []string{"Bearer clé"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := FromAuthorization(tt.values)
			if ok != (tt.want != "") || got != tt.want {
				t.Errorf("FromAuthorization(%q) = %q, %v; want %q, %v", tt.values, got, ok, tt.want, tt.want != "")
			}
		})
	}
}

func TestNoAllocations(t *testing.T) {
	s, err := New()
	if err != nil {
		t.Fatal(err)
	}
	header := []string{"Bearer " + s}
	var sink bool
	for name, f := range map[string]func(){
		"Valid":             func() { sink = Valid(s) },
		"FromAuthorization": func() { _, sink = FromAuthorization(header) },
	} {
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %v allocations, want 0", name, n)
		}
	}
	_ = sink
}
