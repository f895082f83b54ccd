package clientkey

import (
	"strings"
	"testing"
)

func FuzzValid(f *testing.F) {
	good, err := New()
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{good, "", "vgt_", good[:41], good + "x", strings.ToUpper(good), "vgt_" + strings.Repeat("0", 38)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if Valid(s) && (len(s) != len(good) || !strings.HasPrefix(s, "vgt_")) {
			t.Errorf("Valid(%q) = true for a key of another shape", s)
		}
		if s == good && !Valid(s) {
			t.Error("a generated key is refused")
		}
	})
}

func FuzzFromAuthorization(f *testing.F) {
	for _, s := range []string{"Bearer vgt_x", "bearer  x", "Basic abc", "Bearer", "", "Bearer a b", "BEARER\tx"} {
		f.Add(s, "")
		f.Add(s, s)
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		values := []string{a}
		if b != "" {
			values = append(values, b)
		}
		secret, ok := FromAuthorization(values)
		if !ok {
			return
		}
		if len(values) != 1 || secret == "" || strings.ContainsAny(secret, " \t") || !strings.HasSuffix(a, secret) {
			t.Errorf("FromAuthorization(%q) = %q: accepted what it must refuse", values, secret)
		}
	})
}
