package api

import "testing"

func TestRedactCredentials(t *testing.T) {
	key := "vgt_0123456789abcdefghijABCDEFGHIJ0123456789"
	jwt := "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
	cases := []struct{ in, want string }{
		{"/v1/models", "/v1/models"},
		{"/v1/models/" + key, "/v1/models/REDACTED"},
		{"/v1/" + key + "/x/" + jwt + "?a", "/v1/REDACTED/x/REDACTED?a"},
		{"vgvgt_" + key[4:] + "~", "vgREDACTED~"},
		{"vgt_", "REDACTED"},
	}
	for _, tc := range cases {
		got := RedactCredentials(tc.in)
		if got != tc.want {
			t.Errorf("RedactCredentials(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if HasCredential(got) {
			t.Errorf("RedactCredentials(%q) = %q still holds a credential", tc.in, got)
		}
	}
}

func TestPercentDecoded(t *testing.T) {
	for in, want := range map[string]string{
		"plain":            "plain",
		"vgt%5Fabc":        "vgt_abc",
		"100%&x=vgt%5Fabc": "100%&x=vgt_abc",
		"vgt%255Fabc":      "vgt_abc",
		"%zz%4":            "%zz%4",
		"%41%62":           "Ab",
	} {
		if got := PercentDecoded(in); got != want {
			t.Errorf("PercentDecoded(%q) = %q, want %q", in, got, want)
		}
	}
}
