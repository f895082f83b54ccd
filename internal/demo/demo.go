// Package demo is the browser demo of the proxy: a chat page (plain HTML,
// CSS and JavaScript, no build step) that calls the API from another web
// origin, streams answers and shows the caller's limits and the proxy's
// refusals. The page calls with a demo client key, or as a signed-in user
// with a token that a small app backend (Backend) mints for it. The page
// reads its API base URL and what it may use from config.js, which is not
// embedded: whoever serves the page writes it.
package demo

import (
	"embed"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
)

//go:embed index.html app.js style.css
var files embed.FS

// Config is what the page is told in config.js.
type Config struct {
	APIBase string `json:"apiBase"` // the proxy's origin, such as http://localhost:8080
	// Key is a client key the page may call with; only ever a demo's or a
	// test's. Empty, the page has no "Demo key" mode and holds no key.
	Key string `json:"key,omitempty"`
	// SignIn offers the "Signed-in user" mode: the page signs a user in
	// with POST /api/token on its own origin (see Backend) and calls with
	// the token it gets.
	SignIn bool `json:"signIn,omitempty"`
	// MaxTokens is the max_tokens of the page's chat requests; 0 sends
	// none, so the tier's cap or the API's default applies.
	MaxTokens int `json:"maxTokens,omitempty"`
}

// ConfigJS returns config.js for c.
func ConfigJS(c Config) []byte {
	b, _ := json.Marshal(c) // strings, a bool and an int always marshal; <, > and & come escaped
	return append(append([]byte("window.VIGTHORIA = "), b...), ";\n"...)
}

// Write writes the page and its config.js into dir, for a file server.
func Write(dir string, c Config) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.CopyFS(dir, files); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "config.js"), ConfigJS(c), 0o644)
}

// Handler serves the page with config.js for c. Nothing is cached, so a
// page reloaded after a restart gets the new key.
func Handler(c Config) http.Handler {
	static := http.FileServerFS(files)
	config := ConfigJS(c)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		if r.URL.Path == "/config.js" {
			w.Header().Set("Content-Type", "text/javascript; charset=utf-8")
			w.Write(config)
			return
		}
		static.ServeHTTP(w, r)
	})
}
