// Package hooktest is a webhook receiver for tests: a real HTTP server
// that verifies each request's Standard Webhooks signature, written from
// the spec apart from the sender's code, and counts deliveries per
// webhook-id.
package hooktest

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Secret is a valid whsec_ secret for tests.
const Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

// Body is an alert webhook's body: percent for a threshold crossed,
// requested for a refusal, no other field.
type Body struct {
	Type      string `json:"type"`
	KeyID     string `json:"key_id"`
	KeyName   string `json:"key_name"`
	Tier      string `json:"tier"`
	Period    string `json:"period"`
	Used      int64  `json:"used"`
	Limit     int64  `json:"limit"`
	Percent   int    `json:"percent"`
	Requested *int64 `json:"requested"`
	At        string `json:"at"`
	// Key, State and Status are an upstream_key alert's.
	Key    string `json:"key"`
	State  string `json:"state"`
	Status int    `json:"status"`
}

// Receiver is a webhook endpoint. It answers FailFirst times 500 to each
// webhook-id before it accepts it, and records what it accepted.
type Receiver struct {
	URL       string
	FailFirst int

	t      testing.TB
	secret []byte

	mu       sync.Mutex // protects the following
	attempts map[string]int
	accepted map[string]int
	bodies   []Body
}

// New starts a Receiver that verifies signatures with secret ("whsec_…")
// and stops when the test ends. Every bad request fails the test.
func New(t testing.TB, secret string) *Receiver {
	t.Helper()
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil {
		t.Fatalf("test secret: %v", err)
	}
	r := &Receiver{t: t, secret: key, attempts: make(map[string]int), accepted: make(map[string]int)}
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	r.URL = srv.URL + "/hook"
	return r
}

// ServeHTTP verifies a delivery per the spec: the signature over
// "<webhook-id>.<webhook-timestamp>.<body>", a timestamp within 5
// minutes, a JSON body of the alert's fields only.
func (r *Receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		r.t.Errorf("receiver: reading the body: %v", err)
		return
	}
	if err := r.verify(req, body); err != nil {
		r.t.Errorf("receiver: %v", err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var b Body
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		r.t.Errorf("receiver: body %s: %v", body, err)
	}
	if _, err := time.Parse(time.RFC3339, b.At); err != nil {
		r.t.Errorf("receiver: at %q is not RFC 3339: %v", b.At, err)
	}
	id := req.Header.Get("webhook-id")
	r.mu.Lock()
	defer r.mu.Unlock()
	r.attempts[id]++
	if r.attempts[id] <= r.FailFirst {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	r.accepted[id]++
	r.bodies = append(r.bodies, b)
	w.WriteHeader(http.StatusNoContent)
}

func (r *Receiver) verify(req *http.Request, body []byte) error {
	if req.Method != http.MethodPost || req.Header.Get("Content-Type") != "application/json" {
		return fmt.Errorf("got %s with Content-Type %q, want a JSON POST", req.Method, req.Header.Get("Content-Type"))
	}
	id, ts, sigs := req.Header.Get("webhook-id"), req.Header.Get("webhook-timestamp"), req.Header.Get("webhook-signature")
	if id == "" || ts == "" || sigs == "" {
		return fmt.Errorf("missing headers: id %q, timestamp %q, signature %q", id, ts, sigs)
	}
	secs, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("webhook-timestamp %q: %v", ts, err)
	}
	if d := time.Since(time.Unix(secs, 0)); d > 5*time.Minute || d < -5*time.Minute {
		return fmt.Errorf("webhook-timestamp %s is %s off", ts, d)
	}
	mac := hmac.New(sha256.New, r.secret)
	fmt.Fprintf(mac, "%s.%s.%s", id, ts, body)
	want := mac.Sum(nil)
	for _, sig := range strings.Fields(sigs) {
		version, enc, _ := strings.Cut(sig, ",")
		got, err := base64.StdEncoding.DecodeString(enc)
		if version == "v1" && err == nil && hmac.Equal(got, want) {
			return nil
		}
	}
	return fmt.Errorf("no valid v1 signature in %q", sigs)
}

// Accepted returns how many times each webhook-id was accepted.
func (r *Receiver) Accepted() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.accepted)
}

// Attempts returns how many requests each webhook-id came in.
func (r *Receiver) Attempts() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.attempts)
}

// Bodies returns the accepted bodies, in order of acceptance.
func (r *Receiver) Bodies() []Body {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Body(nil), r.bodies...)
}

// WaitAccepted waits up to timeout until n deliveries were accepted, and
// returns the bodies then.
func (r *Receiver) WaitAccepted(n int, timeout time.Duration) []Body {
	deadline := time.Now().Add(timeout)
	for {
		b := r.Bodies()
		if len(b) >= n || time.Now().After(deadline) {
			return b
		}
		time.Sleep(10 * time.Millisecond)
	}
}
