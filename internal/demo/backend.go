package demo

import (
	"bytes"
	"encoding/json"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// TokenPath is the backend's sign-in route, on the page's own origin.
const TokenPath = "/api/token"

// Bounds of the backend's work for one sign-in.
const (
	maxSignInBody = 4 << 10
	maxUser       = 64 // characters, as POST /vigthoria/tokens allows
	maxMintAnswer = 64 << 10
	mintTimeout   = 10 * time.Second
)

// BackendConfig is what the demo's app backend needs to mint its users'
// tokens.
type BackendConfig struct {
	APIBase string // the proxy's origin, such as http://localhost:8080
	// MintKey is a client key that may mint tokens of Tier. It stays on
	// the server: the page never sees it.
	MintKey string
	Tier    string        // the tier of the users' tokens
	TTL     time.Duration // their life; 0 leaves it to the proxy (15m)
}

// Backend returns the demo's app backend: it plays the server of an app
// that signs its users in and holds a minting key. POST /api/token with
// {"user":"alice"} signs alice in (a demo sign-in: the name is all it
// checks) and answers with the proxy's answer to POST /vigthoria/tokens
// for her, status and body as they came, so that the page sees the
// proxy's refusals as they are.
func Backend(c BackendConfig) http.Handler {
	client := &http.Client{Timeout: mintTimeout}
	mintURL := strings.TrimRight(c.APIBase, "/") + "/vigthoria/tokens"
	ttl := ""
	if c.TTL > 0 {
		ttl = c.TTL.String()
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		if r.URL.Path != TokenPath {
			writeError(w, http.StatusNotFound, "not_found", "The backend serves "+TokenPath+" only.")
			return
		}
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			writeError(w, http.StatusMethodNotAllowed, "method_not_allowed", "Sign in with POST.")
			return
		}
		// JSON only: a page of another site cannot send it without a
		// preflight, which this backend never allows.
		if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
			writeError(w, http.StatusUnsupportedMediaType, "invalid_sign_in", "Send the sign-in as application/json.")
			return
		}
		var in struct {
			User string `json:"user"`
		}
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxSignInBody)).Decode(&in); err != nil || !validUser(in.User) {
			writeError(w, http.StatusBadRequest, "invalid_sign_in", `Sign in with {"user": "alice"}: a name of 1 to 64 printable characters.`)
			return
		}
		body, _ := json.Marshal(map[string]string{"user": in.User, "tier": c.Tier, "ttl": ttl})
		req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, mintURL, bytes.NewReader(body))
		if err != nil {
			writeError(w, http.StatusInternalServerError, "backend_misconfigured", "The backend's API address is not a URL.")
			return
		}
		req.Header.Set("Authorization", "Bearer "+c.MintKey)
		req.Header.Set("Content-Type", "application/json")
		res, err := client.Do(req)
		if err != nil {
			writeError(w, http.StatusBadGateway, "api_unreachable", "The backend could not reach the API to mint a token.")
			return
		}
		defer res.Body.Close()
		w.Header().Set("Content-Type", res.Header.Get("Content-Type"))
		w.WriteHeader(res.StatusCode)
		io.Copy(w, io.LimitReader(res.Body, maxMintAnswer))
	})
}

// validUser reports whether a name is one the proxy takes as a token's
// user, so that a bad name is refused before any call to it.
func validUser(user string) bool {
	return user != "" && utf8.ValidString(user) && utf8.RuneCountInString(user) <= maxUser &&
		!strings.ContainsFunc(user, func(r rune) bool { return !unicode.IsGraphic(r) })
}

// writeError answers in the API's error shape, which the page reads.
func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{
		"message": msg, "type": "invalid_request_error", "code": code,
	}})
}
