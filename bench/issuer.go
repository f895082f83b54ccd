package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
)

// Who the jwt workload's token names, and for what.
const (
	benchAudience = "bench"
	benchUser     = "bench-user"
)

// issuer is a stand-in OpenID provider for the jwt workload: discovery
// and a JWKS of one RS256 key, the most common signature of providers,
// served by this process on loopback.
type issuer struct {
	url             string // http://127.0.0.1:PORT
	token           string // of benchUser, valid for a day
	mintedLookalike string // see lookalikeMinted
	srv             *http.Server
}

func startIssuer() (*issuer, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the stand-in issuer: %w", err)
	}
	iss := &issuer{url: "http://" + ln.Addr().String()}
	if iss.mintedLookalike, err = lookalikeMinted(); err != nil {
		ln.Close()
		return nil, err
	}
	const kid = "bench"
	now := time.Now()
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{
		"iss": iss.url, "aud": benchAudience, "sub": benchUser,
		"iat": now.Unix(), "exp": now.Add(24 * time.Hour).Unix(),
	})
	tok.Header["kid"] = kid
	if iss.token, err = tok.SignedString(key); err != nil {
		ln.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"issuer": iss.url, "jwks_uri": iss.url + "/keys"})
	})
	mux.HandleFunc("GET /keys", func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{
			{Key: &key.PublicKey, KeyID: kid, Algorithm: "RS256", Use: "sig"},
		}})
	})
	iss.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go iss.srv.Serve(ln)
	return iss, nil
}

// tokenRequestBody asks a target for a token of the bench tier for one
// user of the app, valid for as long as a run may last (moduleSite's
// max_token_ttl): a page would renew it, the workloads send it for the
// whole run.
const tokenRequestBody = `{"user":"` + benchUser + `","tier":"` + benchTier + `","ttl":"24h"}`

// mintToken asks the target at url for a token with the minter's key, as
// an app's backend does for a signed-in user of its page.
func mintToken(ctx context.Context, client *http.Client, url, key string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/vigthoria/tokens", strings.NewReader(tokenRequestBody))
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	res, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	if err != nil {
		return "", err
	}
	var answer struct {
		Token string `json:"token"`
	}
	if res.StatusCode != http.StatusCreated || json.Unmarshal(body, &answer) != nil || answer.Token == "" {
		return "", fmt.Errorf("POST /vigthoria/tokens answered %d: %.300s", res.StatusCode, body)
	}
	return answer.Token, nil
}

// lookalikeMinted returns a token shaped as the module mints them
// (EdDSA, its claims), signed by a key of this process: what plain Caddy
// is sent by the chat-minted workload, which it passes on unchecked.
func lookalikeMinted() (string, error) {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", err
	}
	keyID, err := keys.NewID()
	if err != nil {
		return "", err
	}
	now := time.Now()
	tok := jwt.NewWithClaims(jwt.SigningMethodEdDSA, jwt.MapClaims{
		"iss": keys.MintIssuer, "aud": []string{keys.MintAudience}, "sub": benchUser, "tier": benchTier,
		"key_id": keyID, "iat": now.Unix(), "exp": now.Add(24 * time.Hour).Unix(), "jti": rand.Text()[:22],
	})
	tok.Header["kid"] = rand.Text()[:16]
	return tok.SignedString(key)
}
