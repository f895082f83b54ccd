package proxy

import (
	"net/http"
	"strings"
	"testing"
)

// The model list is named by what changes the upstream's answer: the URL
// and server key, and the headers that go with its fetch, and nothing
// else of the caller's.
func TestModelsKey(t *testing.T) {
	up := func(key string, extra ...string) *Upstream {
		return &Upstream{tenant: Fingerprint("https://api.example.com/v1", key), modelsHeaders: append(modelsShapers[:], extra...)}
	}
	a, b := up("sk-a"), up("sk-b")
	sdk := http.Header{"Accept": {"application/json"}, "User-Agent": {"OpenAI/Go"}, "X-Request-Id": {"r1"}}
	if a.modelsKey(sdk) == b.modelsKey(sdk) {
		t.Error("two server keys share a model list")
	}
	other := http.Header{"Accept": {"application/json"}, "User-Agent": {"curl"}, "X-Stainless-Lang": {"go"}}
	if a.modelsKey(sdk) != a.modelsKey(other) {
		t.Error("a caller's User-Agent or request ID names another list")
	}
	for _, h := range []http.Header{
		{"Accept": {"application/json"}, "Openai-Beta": {"assistants=v2"}},
		{"Accept": {"application/json"}, "Accept-Language": {"de"}},
		{"Accept": {"application/json", "Openai-Beta"}},
	} {
		if a.modelsKey(h) == a.modelsKey(sdk) {
			t.Errorf("%v names the same list as %v", h, sdk)
		}
	}
	tenant := up("sk-a", "X-Tenant")
	if tenant.modelsKey(http.Header{"X-Tenant": {"1"}}) == tenant.modelsKey(http.Header{"X-Tenant": {"2"}}) {
		t.Error("an upstream_headers value does not name the list")
	}
	if got := tenant.modelsRequestHeader(http.Header{"X-Tenant": {"1"}, "Authorization": {"Bearer vgt_x"}, "User-Agent": {"u"}, "Accept": {"*/*"}}); len(got) != 2 || got.Get("X-Tenant") != "1" || got.Get("Accept") != "*/*" {
		t.Errorf("the fetch carries %v, want Accept and X-Tenant alone", got)
	}
	if strings.Contains(a.modelsKey(sdk), "sk-a") {
		t.Error("the list's name holds the server key")
	}
}
