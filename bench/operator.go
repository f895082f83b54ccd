package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// What the operator's features of a target talk to, served by this
// process: the alerts' webhook receiver and the dashboard's login.

// receiver is the alerts' webhook: it counts what it is sent and answers
// 204. The targets' thresholds are never reached, so a POST it gets
// says a threshold fired that should not have.
type receiver struct {
	url    string // http://127.0.0.1:PORT/alerts
	secret string // the signing secret the targets are given, whsec_…
	posts  atomic.Int64
	srv    *http.Server
}

func startReceiver() (*receiver, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the alerts receiver: %w", err)
	}
	raw := make([]byte, 32)
	_, _ = rand.Read(raw) // never fails (crypto/rand)
	r := &receiver{url: "http://" + ln.Addr().String() + "/alerts", secret: "whsec_" + base64.StdEncoding.EncodeToString(raw)}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /alerts", func(w http.ResponseWriter, _ *http.Request) {
		r.posts.Add(1)
		w.WriteHeader(http.StatusNoContent)
	})
	r.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go r.srv.Serve(ln)
	return r, nil
}

// operator is the dashboard's one login, new each run.
type operator struct {
	password string
	hash     string // bcrypt, as basic_auth takes it
}

// operatorName is the operator's user name in basic_auth, as moduleSite
// names it.
const operatorName = "operator"

func newOperator() (operator, error) {
	password := rand.Text()
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return operator{}, fmt.Errorf("hashing the operator's password: %w", err)
	}
	return operator{password: password, hash: string(hash)}, nil
}

// csrfMeta precedes the CSRF token in the dashboard's page.
var csrfMeta = []byte(`<meta name="csrf-token" content="`)

// check opens the dashboard at url as the operator would: its page, then
// the keys in its JSON with the page's CSRF token and cookie; both must
// answer 200.
func (op operator) check(ctx context.Context, client *http.Client, url string) error {
	page, res, err := op.get(ctx, client, url+"/", nil)
	if err != nil {
		return err
	}
	_, rest, ok := bytes.Cut(page, csrfMeta)
	token, _, _ := bytes.Cut(rest, []byte(`"`))
	if !ok || len(res.Cookies()) == 0 {
		return fmt.Errorf("GET %s/ as the operator: no CSRF token or cookie in the page", url)
	}
	_, _, err = op.get(ctx, client, url+"/api/keys", func(req *http.Request) {
		req.Header.Set("X-CSRF-Token", string(token))
		for _, c := range res.Cookies() {
			req.AddCookie(c)
		}
	})
	return err
}

// get GETs url as the operator, with what set adds to the request, and
// wants a 200.
func (op operator) get(ctx context.Context, client *http.Client, url string, set func(*http.Request)) ([]byte, *http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, nil, err
	}
	req.SetBasicAuth(operatorName, op.password)
	if set != nil {
		set(req)
	}
	res, err := client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	if err == nil && res.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s as the operator: %s: %.200s", url, res.Status, body)
	}
	return body, res, err
}
