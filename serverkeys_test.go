package vigthoria

import (
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestServerKeysResolve(t *testing.T) {
	t.Setenv("VGT_TEST_K1", "sk-one-SECRET")
	t.Setenv("VGT_TEST_K2", "sk-two-SECRET")
	core, logs := observer.New(zapcore.WarnLevel)
	h := &Handler{APIKey: "{env.VGT_TEST_K1}", APIKeys: &APIKeys{Keys: []ServerKeyConfig{
		{Key: "{env.VGT_TEST_K2}", Name: "two", Weight: 3, Models: []string{"vigthoria-pro-*"}},
		{Key: "sk-literal-SECRET", Name: "lit"},
	}}, logger: zap.New(core)}
	keys, err := h.serverKeys()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 3 || keys[0].Key != "sk-one-SECRET" || keys[1].Key != "sk-two-SECRET" || keys[1].Weight != 3 || keys[2].Name != "lit" {
		t.Fatalf("got %+v, want api_key then the pool's two keys, resolved", keys)
	}
	warned := logs.FilterMessageSnippet("api_keys: key 2 is a literal").Len()
	if warned != 1 || logs.Len() != 1 {
		t.Fatalf("got %d warnings, want one about the literal key 2", logs.Len())
	}
	for _, e := range logs.All() {
		if strings.Contains(e.Message, "SECRET") {
			t.Fatalf("a warning names the key: %s", e.Message)
		}
	}

	for name, bad := range map[string]*Handler{
		"unset placeholder": {APIKeys: &APIKeys{Keys: []ServerKeyConfig{{Key: "{env.VGT_TEST_UNSET}"}}}},
		"name not a label":  {APIKeys: &APIKeys{Keys: []ServerKeyConfig{{Key: "{env.VGT_TEST_K1}", Name: "Main Key"}}}},
		"name twice":        {APIKeys: &APIKeys{Keys: []ServerKeyConfig{{Key: "{env.VGT_TEST_K1}", Name: "a"}, {Key: "{env.VGT_TEST_K2}", Name: "a"}}}},
		"bad glob":          {APIKeys: &APIKeys{Keys: []ServerKeyConfig{{Key: "{env.VGT_TEST_K1}", Models: []string{"vigthoria-["}}}}},
		"no key":            {},
	} {
		bad.logger = zap.NewNop()
		if _, err := bad.serverKeys(); err == nil {
			t.Errorf("%s: no error", name)
		} else if strings.Contains(err.Error(), "SECRET") {
			t.Errorf("%s: the error names the key: %v", name, err)
		}
	}
}
