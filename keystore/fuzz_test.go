package keystore

import (
	"strings"
	"testing"
)

func FuzzValidSecret(f *testing.F) {
	good, err := NewSecret()
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{good, "", "vgt_", good[:41], good + "x", strings.ToUpper(good), "vgt_" + strings.Repeat("0", 38)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ValidSecret(s) && (len(s) != len(good) || !strings.HasPrefix(s, "vgt_")) {
			t.Errorf("ValidSecret(%q) = true for a key of another shape", s)
		}
		if s == good && !ValidSecret(s) {
			t.Error("a generated key is refused")
		}
	})
}

func FuzzParseAuthorization(f *testing.F) {
	for _, s := range []string{"Bearer vgt_x", "bearer  x", "Basic abc", "Bearer", "", "Bearer a b", "BEARER\tx"} {
		f.Add(s, "")
		f.Add(s, s)
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		values := []string{a}
		if b != "" {
			values = append(values, b)
		}
		secret, ok := ParseAuthorization(values)
		if !ok {
			return
		}
		if len(values) != 1 || secret == "" || strings.ContainsAny(secret, " \t") || !strings.HasSuffix(a, secret) {
			t.Errorf("ParseAuthorization(%q) = %q: accepted what it must refuse", values, secret)
		}
	})
}
