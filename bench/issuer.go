package main

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
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
	url   string // http://127.0.0.1:PORT
	token string // of benchUser, valid for a day
	srv   *http.Server
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
