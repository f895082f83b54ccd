package vigthoria

import "testing"

func TestNamesCredential(t *testing.T) {
	for name, want := range map[string]bool{
		"X-Api-Key": true, "Api-Key": true, "X-Goog-Api-Key": true, "X-Auth-Token": true, "X-Amz-Security-Token": true,
		"X-Session-Id": true, "X-Apikey": true, "X-Mytoken": true, "X-Client-Secret": true, "X-Password": true,
		"Idempotency-Key": false, "User-Agent": false, "X-Stainless-Os": false, "Content-Type": false, "Accept": false,
	} {
		if got := namesCredential(name); got != want {
			t.Errorf("namesCredential(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestCredentialShaped(t *testing.T) {
	for s, want := range map[string]bool{
		"vgt_abc": true, "curl-vgt_": false, "x vgt_ y": false, "eyJhbGci.eyJ": true, "eyJhbGciOiJ": false, "probe-eyJ": false,
		"a eyJ x vgt_1": true, "": false,
	} {
		if got := credentialShaped(s); got != want {
			t.Errorf("credentialShaped(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestRedactURI(t *testing.T) {
	for uri, want := range map[string]string{
		"/v1/models":                 "/v1/models",
		"/v1/models/vgt_abc":         "/v1/models/REDACTED",
		"/v1/models/vgt%5Fabc":       "/REDACTED",
		"/v1/models?api_key=x":       "/v1/models?REDACTED",
		"/v1/models?x=vgt%5Fabc&y=1": "/v1/models?REDACTED",
		"/v1/models?limit=5":         "/v1/models?limit=5",
		"/v1/files/eyJa.eyJb.c?n=1":  "/v1/files/REDACTED?n=1",
		// A stray '%' beside the escaped key, which url.QueryUnescape and
		// url.PathUnescape refuse whole; an escape escaped again.
		"/v1/models?q=100%&x=vgt%5Fabc": "/v1/models?REDACTED",
		"/v1/models/100%/vgt%5Fabc":     "/REDACTED",
		"/v1/models?x=vgt%255Fabc":      "/v1/models?REDACTED",
		"/v1/models?q=100%":             "/v1/models?q=100%",
	} {
		if got := redactURI(uri); got != want {
			t.Errorf("redactURI(%q) = %q, want %q", uri, got, want)
		}
	}
}
