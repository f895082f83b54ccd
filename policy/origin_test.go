package policy

import (
	"strings"
	"testing"
)

func TestCanonicalOrigin(t *testing.T) {
	for _, tt := range []struct{ in, want, err string }{
		{in: "https://app.example.com", want: "https://app.example.com"},
		{in: "https://A.com:443", want: "https://a.com"},
		{in: "HTTP://A.com:80", want: "http://a.com"},
		{in: "http://a.com:443", want: "http://a.com:443"},
		{in: "https://a.com:0443", want: "https://a.com"},
		{in: "http://127.0.0.1:8080", want: "http://127.0.0.1:8080"},
		{in: "http://[::1]:8080", want: "http://[::1]:8080"},
		{in: "http://[FE80::1]", want: "http://[fe80::1]"},
		{in: "https://a.com/", err: "without a path"},
		{in: "https://a.com/x", err: "without a path"},
		{in: "https://a.com?x", err: "without a path"},
		{in: "https://u@a.com", err: "without a path"},
		{in: "ftp://a.com", err: "http:// or https://"},
		{in: "a.com", err: "http:// or https://"},
		{in: "https://", err: "want scheme://host"},
		{in: "https://a.com:", err: "want a port"},
		{in: "https://a.com:99999", err: "1 to 65535"},
		{in: "https://bücher.example", err: "punycode"},
		{in: "null", err: "http:// or https://"},
	} {
		got, err := CanonicalOrigin(tt.in)
		switch {
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("CanonicalOrigin(%q) = %q, %v, want an error with %q", tt.in, got, err, tt.err)
		case tt.err == "" && (err != nil || got != tt.want):
			t.Errorf("CanonicalOrigin(%q) = %q, %v, want %q", tt.in, got, err, tt.want)
		}
	}
	if err := CheckOrigin("https://A.com:443"); err == nil || !strings.Contains(err.Error(), "write 'https://a.com'") {
		t.Errorf("CheckOrigin of a non-canonical origin: %v, want the form to write", err)
	}
	if err := CheckOrigin("https://a.com"); err != nil {
		t.Errorf("CheckOrigin of a canonical origin: %v", err)
	}
}
