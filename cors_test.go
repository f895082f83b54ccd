package vigthoria

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/vigthoria/caddy-vigthoria/caller"
)

func TestJSONContentType(t *testing.T) {
	for _, c := range []struct {
		values []string
		want   bool
	}{
		{nil, true},
		{[]string{"application/json"}, true},
		{[]string{"Application/JSON; charset=utf-8"}, true},
		{[]string{" application/json ;charset=UTF-8"}, true},
		{[]string{""}, false},
		{[]string{"text/plain"}, false},
		{[]string{"text/plain;charset=UTF-8"}, false},
		{[]string{"application/x-www-form-urlencoded"}, false},
		{[]string{"multipart/form-data; boundary=x"}, false},
		{[]string{"application/jsonp"}, false},
		{[]string{"application/json", "application/json"}, false},
	} {
		h := http.Header{}
		if c.values != nil {
			h["Content-Type"] = c.values
		}
		if got := jsonContentType(h); got != c.want {
			t.Errorf("Content-Type %q: %v, want %v", c.values, got, c.want)
		}
	}
}

func TestCrossSite(t *testing.T) {
	cors := []string{"https://app.example.com"}
	for _, c := range []struct {
		name, host, origin, site string
		want                     bool
	}{
		{"a server", "api.example.com", "", "", false},
		{"a navigation the user made", "api.example.com", "", "none", false},
		{"same-origin, no Origin", "api.example.com", "", "same-origin", false},
		{"its own origin", "api.example.com", "https://api.example.com", "same-origin", false},
		{"its own origin, TLS ended in front", "api.example.com", "https://API.example.com", "", false},
		{"its own origin with a port", "127.0.0.1:8080", "http://127.0.0.1:8080", "", false},
		{"an origin of cors", "api.example.com", "https://app.example.com", "same-site", false},
		{"another origin", "api.example.com", "https://evil.example", "cross-site", true},
		{"another port", "127.0.0.1:8080", "http://127.0.0.1:8081", "same-site", true},
		{"a sibling", "api.example.com", "https://www.example.com", "same-site", true},
		{"an opaque origin", "api.example.com", "null", "cross-site", true},
		{"an image of another site", "api.example.com", "", "cross-site", true},
		{"an image of a sibling", "api.example.com", "", "same-site", true},
	} {
		r := httptest.NewRequest(http.MethodPost, "http://"+c.host+"/v1/chat/completions", nil)
		if c.origin != "" {
			r.Header.Set("Origin", c.origin)
		}
		if c.site != "" {
			r.Header.Set("Sec-Fetch-Site", c.site)
		}
		if got := crossSite(r, cors); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}

// The checks run on every request: they allocate nothing.
func TestBrowserChecksAllocateNothing(t *testing.T) {
	r := httptest.NewRequest(http.MethodPost, "http://api.example.com/v1/chat/completions", nil)
	r.Header.Set("Content-Type", "application/json; charset=utf-8")
	r.Header.Set("Origin", "https://api.example.com")
	if n := testing.AllocsPerRun(100, func() {
		_ = jsonContentType(r.Header) && caller.FoundIdentity.Ambient() && crossSite(r, nil)
	}); n != 0 {
		t.Errorf("%v allocations, want none", n)
	}
}
