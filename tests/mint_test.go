package tests

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	redisstore "github.com/vigthoria/caddy-vigthoria/store/redis"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
	"github.com/openai/openai-go/v3"

	keystore "github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/standin"
)

// mintedToken is the answer of POST /vigthoria/tokens.
type mintedToken struct {
	Token     string   `json:"token"`
	ExpiresAt int64    `json:"expires_at"`
	User      string   `json:"user"`
	Tier      string   `json:"tier"`
	Models    []string `json:"models"`
}

// mintRaw asks the proxy for a token with key and the request body req.
func (e *env) mintRaw(t *testing.T, key string, req any) *http.Response {
	t.Helper()
	return e.do(t, http.MethodPost, "/vigthoria/tokens", jsonBody(req),
		http.Header{"Authorization": {"Bearer " + key}, "Content-Type": {"application/json"}})
}

// mint asks for a token and fails the test unless it gets one.
func (e *env) mint(t *testing.T, key string, req map[string]any) mintedToken {
	t.Helper()
	res := e.mintRaw(t, key, req)
	body, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusCreated {
		t.Fatalf("POST /vigthoria/tokens %v: %d %s", req, res.StatusCode, body)
	}
	if cc := res.Header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("a minted token's Cache-Control = %q, want no-store", cc)
	}
	var m mintedToken
	if err := json.Unmarshal(body, &m); err != nil || m.Token == "" {
		t.Fatalf("POST /vigthoria/tokens answered %s: %v", body, err)
	}
	return m
}

// mintWhenKnown mints the first token of a key just made with the CLI,
// which the proxy knows within a second.
func (e *env) mintWhenKnown(t *testing.T, key string, req map[string]any) mintedToken {
	t.Helper()
	eventually(t, "the new key may mint", func() bool {
		res := e.mintRaw(t, key, map[string]any{"user": "probe", "tier": req["tier"]})
		return res.StatusCode == http.StatusCreated
	})
	return e.mint(t, key, req)
}

// startMinting starts Caddy with a backend key of tier app that may
// mint tokens of tiers web and webplus, and returns its ID and secret.
func startMinting(t *testing.T, app string) (e *env, keyID, key string) {
	t.Helper()
	e = start(t, manyFailures,
		"tier app"+app,
		"tier web {\n\t\t\trequests 2/1h burst 2\n\t\t\tmodels vigthoria-fast-*\n\t\t}",
		"tier webplus")
	keyID, key = e.addKey(t, "app", "--mint", "web,webplus")
	return e, keyID, key
}

// TestMintedTokensEndToEnd follows an app's backend that mints a token
// per signed-in user, and the users who call with them through the
// official client: each user has the token's tier limits, the proxy
// never forwards the token, the users' usage rolls up to the key, the
// published keys verify the tokens, and revoking the key ends them.
func TestMintedTokensEndToEnd(t *testing.T) {
	e, keyID, backend := startMinting(t, "")
	alice := e.mintWhenKnown(t, backend, map[string]any{"user": "alice", "tier": "web", "ttl": "10m"})
	if alice.User != "alice" || alice.Tier != "web" {
		t.Errorf("minted %+v, want alice of tier web", alice)
	}
	if d := time.Until(time.Unix(alice.ExpiresAt, 0)); d < 9*time.Minute || d > 10*time.Minute+time.Second {
		t.Errorf("expires_at is %v from now, want 10m", d)
	}
	e.upstream.Reset()

	// Alice's chat and stream, through the official client.
	client := newClient(e.caddy.URL, alice.Token)
	if _, err := client.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
		t.Fatalf("alice's chat: %v", err)
	}
	stream := client.Chat.Completions.NewStreaming(t.Context(), chatParams("stream please"))
	chunks := 0
	for stream.Next() {
		chunks++
	}
	if err := stream.Err(); err != nil || chunks == 0 {
		t.Fatalf("alice's stream: %d chunks, %v", chunks, err)
	}
	signature := alice.Token[strings.LastIndexByte(alice.Token, '.')+1:]
	for _, r := range e.upstream.Requests() {
		if got := r.Header.Get("Authorization"); got != "Bearer "+serverKey {
			t.Errorf("upstream Authorization = %q, want the server key", got)
		}
		for name, values := range r.Header {
			if strings.Contains(strings.Join(values, " "), signature) {
				t.Errorf("the token reached the upstream in %s", name)
			}
		}
	}

	// Her tier allows two requests: the third is hers to wait for, and
	// bob, with a token of his own, is not affected.
	_, err := client.Chat.Completions.New(t.Context(), chatParams("a third"))
	wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded")
	bob := e.mint(t, backend, map[string]any{"user": "bob", "tier": "web"})
	bobClient := newClient(e.caddy.URL, bob.Token)
	if _, err := bobClient.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
		t.Fatalf("bob is refused after alice spent her limit: %v", err)
	}

	// The token's models narrow its tier's: carol may use fast models only.
	carol := e.mint(t, backend, map[string]any{"user": "carol", "tier": "webplus", "models": []string{"vigthoria-fast-*"}})
	carolClient := newClient(e.caddy.URL, carol.Token)
	params := chatParams("hi")
	params.Model = "vigthoria-pro-1"
	_, err = carolClient.Chat.Completions.New(t.Context(), params)
	wantOpenAIError(t, err, http.StatusForbidden, "model_not_allowed")
	models, err := carolClient.Models.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, m := range models.Data {
		ids = append(ids, m.ID)
	}
	if strings.Join(ids, ",") != "vigthoria-fast-1" {
		t.Errorf("carol's models are %v, want only vigthoria-fast-1", ids)
	}
	if _, err := carolClient.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
		t.Fatalf("carol's chat with a fast model: %v", err)
	}

	// Usage: each user's own, and the key's holds its users'.
	eventually(t, "carol's usage counts her answered chat", func() bool {
		u, _ := e.usage(t, carol.Token)
		return u.ClientID == "mint:"+keyID+":carol" && u.Tier == "webplus" && u.MintedBy == keyID && u.Today.Requests == 1
	})
	eventually(t, "the key's usage holds its users' 4 answered requests", func() bool {
		u, _ := e.usage(t, backend)
		return u.ClientID == keyID && u.Today.Requests == 4
	})
	eventually10s(t, "caddy vigthoria usage shows alice's and the key's rows", func() bool {
		return regexp.MustCompile(`(?m)^mint:`+keyID+`:alice\s+\S+\s+`+model+`\s+2\s`).MatchString(e.cli(t, "usage", "mint:"+keyID+":alice")) &&
			regexp.MustCompile(`(?m)^`+keyID+`\s+\S+\s+`+model+`\s+4\s`).MatchString(e.cli(t, "usage", keyID))
	})

	// The published keys verify the tokens, as an app's own backend
	// would check them.
	res := e.do(t, http.MethodGet, "/vigthoria/jwks.json", nil, http.Header{"Authorization": nil})
	var set jose.JSONWebKeySet
	if err := json.NewDecoder(res.Body).Decode(&set); err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("GET /vigthoria/jwks.json: %d %v", res.StatusCode, err)
	}
	claims := jwt.MapClaims{}
	_, err = jwt.ParseWithClaims(alice.Token, claims, func(tok *jwt.Token) (any, error) {
		keys := set.Key(tok.Header["kid"].(string))
		if len(keys) != 1 || !keys[0].IsPublic() {
			return nil, fmt.Errorf("the JWKS has %d public keys of kid %v", len(keys), tok.Header["kid"])
		}
		return keys[0].Key, nil
	}, jwt.WithValidMethods([]string{"EdDSA"}), jwt.WithAudience("vigthoria"), jwt.WithIssuer("caddy-vigthoria"))
	if err != nil {
		t.Fatalf("alice's token does not verify with the published keys: %v", err)
	}
	if claims["sub"] != "alice" || claims["tier"] != "web" || claims["key_id"] != keyID || claims["jti"] == nil || claims["iat"] == nil {
		t.Errorf("alice's token says %v, want sub, tier, key_id, jti and iat", claims)
	}

	// The access log names the user, never the token.
	if !e.caddy.WaitLog(t, `"user_id":"mint:`+keyID+`:alice"`) {
		t.Error("the access log does not name alice as the user")
	}
	if log := e.caddy.ReadLog(t); strings.Contains(log, signature) {
		t.Error("a minted token appears in Caddy's log")
	}

	// Revoking the backend's key ends its users' tokens within a second.
	e.cli(t, "key", "revoke", keyID)
	eventually(t, "bob's token is refused once the key is revoked", func() bool {
		status, _ := e.chatStatus(t, "Bearer "+bob.Token)
		return status == http.StatusUnauthorized
	})
	status, body := e.chatStatus(t, "Bearer "+carol.Token)
	if _, bad := e.chatStatus(t, "Bearer vgt_not-a-key"); status != http.StatusUnauthorized || string(body) != string(bad) {
		t.Errorf("carol's token after the revocation: %d %s, want the one 401 of a bad key", status, body)
	}
	wantAPIError(t, e.mintRaw(t, backend, map[string]any{"user": "dave", "tier": "web"}), http.StatusUnauthorized, "invalid_api_key")
}

// TestMintedUsersShareTheirKeysLimits checks that the minting key's own
// limits bound all of its users together: its concurrency and its
// request rate, whatever each user's own tier allows. Each is tried on a
// Caddy of its own: a slot is freed once the stream's answer is settled,
// a moment after its last byte, which a count of requests must not race.
func TestMintedUsersShareTheirKeysLimits(t *testing.T) {
	t.Run("concurrency", func(t *testing.T) {
		e, _, backend := startMinting(t, " {\n\t\t\tconcurrent 1\n\t\t}")
		alice := e.mintWhenKnown(t, backend, map[string]any{"user": "alice", "tier": "webplus"})
		bob := e.mint(t, backend, map[string]any{"user": "bob", "tier": "webplus"})

		// Alice's stream holds the key's one slot: bob waits, though his
		// own tier has no concurrency limit.
		e.upstream.SetBehavior(standin.Behavior{ChunkDelay: 200 * time.Millisecond})
		aliceClient, bobClient := newClient(e.caddy.URL, alice.Token), newClient(e.caddy.URL, bob.Token)
		stream := aliceClient.Chat.Completions.NewStreaming(t.Context(), chatParams("a long answer"))
		if !stream.Next() {
			t.Fatalf("alice's stream: %v", stream.Err())
		}
		_, err := bobClient.Chat.Completions.New(t.Context(), chatParams("hi"))
		if oe := wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded"); !strings.Contains(oe.Message, "shared by every user") {
			t.Errorf("bob's refusal says %q, want it to say the limit is shared", oe.Message)
		}
		for stream.Next() {
		}
		if err := stream.Err(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("requests", func(t *testing.T) {
		e, _, backend := startMinting(t, " {\n\t\t\trequests 6/1h burst 6\n\t\t}")
		alice := e.mintWhenKnown(t, backend, map[string]any{"user": "alice", "tier": "webplus"}) // the probe and this: 2 requests of the key's
		bob := e.mint(t, backend, map[string]any{"user": "bob", "tier": "webplus"})              // 3
		aliceClient, bobClient := newClient(e.caddy.URL, alice.Token), newClient(e.caddy.URL, bob.Token)
		// The key's 6 requests an hour: 3 more, then every user is refused.
		for i, c := range []openai.Client{aliceClient, bobClient, aliceClient} {
			if _, err := c.Chat.Completions.New(t.Context(), chatParams("hi")); err != nil {
				t.Fatalf("request %d of the key's 6: %v", i+4, err)
			}
		}
		for _, c := range []openai.Client{aliceClient, bobClient} {
			_, err := c.Chat.Completions.New(t.Context(), chatParams("one too many"))
			if oe := wantOpenAIError(t, err, http.StatusTooManyRequests, "rate_limit_exceeded"); !strings.Contains(oe.Message, "shared by every user") {
				t.Errorf("the refusal says %q, want it to say the limit is shared", oe.Message)
			}
		}
		// The key itself has nothing left: its users spent it.
		if status, body := e.chatStatus(t, "Bearer "+backend); status != http.StatusTooManyRequests {
			t.Errorf("the key after its users spent its requests: %d %s, want 429", status, body)
		}
	})
}

// sentCap is the output cap the upstream received in a request body:
// max_tokens, else max_completion_tokens; 0 for none.
func sentCap(t *testing.T, r standin.Request) int64 {
	t.Helper()
	var sent struct {
		MaxTokens           int64 `json:"max_tokens"`
		MaxCompletionTokens int64 `json:"max_completion_tokens"`
	}
	if err := json.Unmarshal(r.Body, &sent); err != nil {
		t.Fatalf("the upstream's request body %s: %v", r.Body, err)
	}
	return max(sent.MaxTokens, sent.MaxCompletionTokens)
}

// modelIDs lists the models GET /v1/models shows the caller of token.
func (e *env) modelIDs(t *testing.T, token string) []string {
	t.Helper()
	res := e.do(t, http.MethodGet, "/v1/models", nil, http.Header{"Authorization": {"Bearer " + token}})
	defer res.Body.Close()
	var list struct {
		Data []struct{ ID string } `json:"data"`
	}
	if err := json.NewDecoder(res.Body).Decode(&list); err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/models: %d %v", res.StatusCode, err)
	}
	ids := make([]string, 0, len(list.Data))
	for _, m := range list.Data {
		ids = append(ids, m.ID)
	}
	return ids
}

// TestMintedUsersNeverPassTheirKey: a minted token's user may do no more
// than the key that minted it, whether the key is narrowed by its own
// settings or by its tier, and whatever the token's tier and its own
// models allow: models, max_tokens (sent or injected), the models list.
// A change of the key's settings narrows tokens minted before it.
func TestMintedUsersNeverPassTheirKey(t *testing.T) {
	e := start(t, manyFailures, "tier app", "tier narrow {\n\t\t\tmodels vigthoria-fast-*\n\t\t\tmax_tokens 50\n\t\t}", "tier web")
	settingsID, bySettings := e.addKey(t, "app", "--mint", "web", "--models", "vigthoria-fast-*", "--max-tokens", "50")
	_, byTier := e.addKey(t, "narrow", "--mint", "web")
	for _, tc := range []struct{ name, key string }{{"the key's settings", bySettings}, {"the key's tier", byTier}} {
		t.Run(tc.name, func(t *testing.T) {
			// The token's tier and its own models allow every model.
			user := e.mintWhenKnown(t, tc.key, map[string]any{"user": "alice", "tier": "web", "models": []string{"vigthoria-*"}})
			e.upstream.Reset()
			refused := func(fields map[string]any, status int, code string) {
				t.Helper()
				if res := e.chatWith(t, user.Token, fields, nil); res.StatusCode != status {
					t.Errorf("a chat with %v: %d, the upstream got cap %d; want %d %s", fields, res.StatusCode, sentCap(t, e.lastRequest(t)), status, code)
				} else {
					wantAPIError(t, res, status, code)
				}
			}
			refused(map[string]any{"model": "vigthoria-pro-1"}, http.StatusForbidden, "model_not_allowed")
			refused(map[string]any{"max_tokens": 1000}, http.StatusBadRequest, "max_tokens_too_large")
			refused(map[string]any{"max_completion_tokens": 1000}, http.StatusBadRequest, "max_tokens_too_large")
			e.wantUpstreamCalls(t, 0)
			e.upstream.Reset()

			if res := e.chatWith(t, user.Token, map[string]any{"max_tokens": 50}, nil); res.StatusCode != http.StatusOK {
				t.Fatalf("a chat within the key's cap: %d", res.StatusCode)
			}
			if res := e.chatWith(t, user.Token, nil, nil); res.StatusCode != http.StatusOK {
				t.Fatalf("a chat without max_tokens: %d", res.StatusCode)
			}
			if got := sentCap(t, e.lastRequest(t)); got != 50 {
				t.Errorf("a chat without max_tokens reached the upstream with cap %d, want the key's 50", got)
			}
			if ids := e.modelIDs(t, user.Token); strings.Join(ids, ",") != "vigthoria-fast-1" {
				t.Errorf("the user's models are %v, want only the key's vigthoria-fast-1", ids)
			}
		})
	}

	// Settings changed after the minting apply to the tokens at once:
	// a lower cap narrows them, cleared models follow the key's tier.
	user := e.mint(t, bySettings, map[string]any{"user": "bob", "tier": "web"})
	e.cli(t, "key", "update", settingsID, "--max-tokens", "20", "--clear-models")
	eventually(t, "the key's new cap reaches its users", func() bool {
		return e.chatWith(t, user.Token, map[string]any{"max_tokens": 21}, nil).StatusCode == http.StatusBadRequest
	})
	if res := e.chatWith(t, user.Token, map[string]any{"model": "vigthoria-pro-1"}, nil); res.StatusCode != http.StatusOK {
		t.Errorf("a model of the key's tier once its models are cleared: %d, want 200", res.StatusCode)
	}
	if got := sentCap(t, e.lastRequest(t)); got != 20 {
		t.Errorf("a chat without max_tokens reached the upstream with cap %d, want the key's new 20", got)
	}
	if ids := e.modelIDs(t, user.Token); len(ids) != 3 {
		t.Errorf("the user's models once the key's are cleared: %v, want the 3 of the tiers", ids)
	}
}

// TestMintedUsersShareTheirKeysOwnLimits: the limits and the budget set
// on the minting key itself, not its tier, bound its users together,
// and a change of them reaches tokens minted before.
func TestMintedUsersShareTheirKeysOwnLimits(t *testing.T) {
	e := start(t, manyFailures, testPrices, "tier app", "tier web")
	keyID, backend := e.addKey(t, "app", "--mint", "web", "--requests", "4/1h", "--budget", "0.001/day")
	alice := e.mintWhenKnown(t, backend, map[string]any{"user": "alice"}) // the probe and this: 2 of the key's requests
	bob := e.mint(t, backend, map[string]any{"user": "bob"})              // 3
	// 1000 micro-units of budget: two chats of 360.
	if status, _, body := budgetChat(t, e.caddy.URL, alice.Token, model); status != http.StatusOK {
		t.Fatalf("request 4 of the key's 4: %d %s", status, body)
	}
	status, _, body := budgetChat(t, e.caddy.URL, bob.Token, model)
	if status != http.StatusTooManyRequests || !strings.Contains(body, "shared by every user") {
		t.Errorf("past the key's own request limit: %d %s, want a 429 shared by its users", status, body)
	}
	e.cli(t, "key", "update", keyID, "--clear-requests")
	eventually(t, "the key's cleared request limit reaches its users", func() bool {
		status, _, _ := budgetChat(t, e.caddy.URL, bob.Token, model)
		return status == http.StatusOK
	})
	status, _, body = budgetChat(t, e.caddy.URL, alice.Token, model)
	if status != http.StatusTooManyRequests || !strings.Contains(body, "budget of tier app") || !strings.Contains(body, "shared by every user") {
		t.Errorf("past the key's own budget: %d %s, want the key's budget refusal, shared by its users", status, body)
	}
}

// TestMintedTokenEndsAtItsExpiry: a minted token works until the
// expires_at its minting answer gave, and not a second after: the proxy
// signs and checks these tokens itself, and allows no clock skew on
// their end, as it does for an OpenID provider's.
func TestMintedTokenEndsAtItsExpiry(t *testing.T) {
	e, _, backend := startMinting(t, "")
	tok := e.mintWhenKnown(t, backend, map[string]any{"user": "alice", "tier": "webplus", "ttl": "3s"}) // at least 2 s, its end truncated to a second
	if status, body := e.chatStatus(t, "Bearer "+tok.Token); status != http.StatusOK {
		t.Fatalf("a fresh token: %d %s", status, body)
	}
	time.Sleep(time.Until(time.Unix(tok.ExpiresAt, 0)) + 500*time.Millisecond)
	_, bad := e.chatStatus(t, "Bearer vgt_not-a-key")
	if status, body := e.chatStatus(t, "Bearer "+tok.Token); status != http.StatusUnauthorized || string(body) != string(bad) {
		t.Errorf("a token half a second past its expires_at: %d %s, want the one 401", status, body)
	}
}

// TestMintRefusals checks each way to ask for a token the proxy must not
// give, and tokens the proxy did not sign.
func TestMintRefusals(t *testing.T) {
	e, keyID, backend := startMinting(t, "")
	user := e.mintWhenKnown(t, backend, map[string]any{"user": "alice", "tier": "web"})
	_, other := e.addKey(t, "app", "--mint", "web,nosuch")
	e.mintWhenKnown(t, other, map[string]any{"user": "probe", "tier": "web"})
	_, bad := e.chatStatus(t, "Bearer vgt_not-a-key")

	cases := []struct {
		name   string
		key    string
		req    any
		status int
		code   string
	}{
		{"a key without the right to mint", e.key, map[string]any{"user": "u", "tier": "web"}, 403, "mint_not_allowed"},
		{"a minted token", user.Token, map[string]any{"user": "u", "tier": "web"}, 401, "invalid_api_key"},
		{"a bad key", "vgt_not-a-key", map[string]any{"user": "u", "tier": "web"}, 401, "invalid_api_key"},
		{"a tier the key may not mint", backend, map[string]any{"user": "u", "tier": "pro"}, 403, "tier_not_mintable"},
		{"a tier not configured", other, map[string]any{"user": "u", "tier": "nosuch"}, 400, "invalid_token_request"},
		{"no tier, of a key of two", backend, map[string]any{"user": "u"}, 400, "invalid_token_request"},
		{"no user", backend, map[string]any{"tier": "web"}, 400, "invalid_token_request"},
		{"a user too long (103 bytes)", backend, map[string]any{"user": strings.Repeat("u", 103), "tier": "web"}, 400, "invalid_token_request"},
		{"a user with a control character", backend, map[string]any{"user": "u\u202e", "tier": "web"}, 400, "invalid_token_request"},
		{"a ttl over max_token_ttl", backend, map[string]any{"user": "u", "tier": "web", "ttl": "2h"}, 400, "invalid_token_request"},
		{"a ttl that is no duration", backend, map[string]any{"user": "u", "tier": "web", "ttl": "forever"}, 400, "invalid_token_request"},
		{"no models", backend, map[string]any{"user": "u", "tier": "web", "models": []string{}}, 400, "invalid_token_request"},
		{"a bad glob", backend, map[string]any{"user": "u", "tier": "web", "models": []string{"a[b"}}, 400, "invalid_token_request"},
		{"too many models", backend, map[string]any{"user": "u", "tier": "web", "models": strings.Split(strings.Repeat("m,", 17)[:33], ",")}, 400, "invalid_token_request"},
		{"an unknown field", backend, map[string]any{"user": "u", "tier": "web", "admin": true}, 400, "invalid_token_request"},
		{"not an object", backend, []string{"u"}, 400, "invalid_token_request"},
		{"a body too large", backend, map[string]any{"user": "u", "tier": "web", "ttl": strings.Repeat(" ", 20<<10)}, 413, "request_too_large"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := e.mintRaw(t, tc.key, tc.req)
			if tc.status == http.StatusUnauthorized {
				body, _ := io.ReadAll(res.Body)
				if res.StatusCode != tc.status || string(body) != string(bad) {
					t.Errorf("got %d %s, want the one 401 of a bad key %s", res.StatusCode, body, bad)
				}
				return
			}
			wantAPIError(t, res, tc.status, tc.code)
		})
	}
	t.Run("GET", func(t *testing.T) {
		wantAPIError(t, e.do(t, http.MethodGet, "/vigthoria/tokens", nil, nil), http.StatusMethodNotAllowed, "method_not_allowed")
	})
	t.Run("a key in the URL", func(t *testing.T) {
		wantAPIError(t, e.do(t, http.MethodPost, "/vigthoria/tokens?key="+backend, jsonBody(map[string]any{"user": "u"}), nil), http.StatusBadRequest, "key_in_query")
	})
	t.Run("another path of the proxy's", func(t *testing.T) {
		wantAPIError(t, e.do(t, http.MethodGet, "/vigthoria/keys", nil, nil), http.StatusNotFound, "unknown_url")
	})

	// Tokens the proxy did not sign, or signed for something else, get
	// the one 401.
	var jwks jose.JSONWebKeySet
	if err := json.NewDecoder(e.do(t, http.MethodGet, "/vigthoria/jwks.json", nil, nil).Body).Decode(&jwks); err != nil || len(jwks.Keys) == 0 {
		t.Fatalf("the JWKS: %v %d keys", err, len(jwks.Keys))
	}
	kid := jwks.Keys[0].KeyID
	_, forger, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Now()
	claims := func(change func(jwt.MapClaims)) jwt.MapClaims {
		c := jwt.MapClaims{"iss": "caddy-vigthoria", "aud": "vigthoria", "sub": "mallory", "tier": "web", "key_id": keyID,
			"iat": now.Unix(), "exp": now.Add(10 * time.Minute).Unix(), "jti": "x"}
		if change != nil {
			change(c)
		}
		return c
	}
	forged := []struct{ name, token string }{
		{"signed with another key under our kid", signWith(t, jwt.SigningMethodEdDSA, kid, claims(nil), forger)},
		{"HS256 with the published key as secret", signWith(t, jwt.SigningMethodHS256, kid, claims(nil), []byte(jwks.Keys[0].Key.(ed25519.PublicKey)))},
		{"alg none", signWith(t, jwt.SigningMethodNone, kid, claims(nil), jwt.UnsafeAllowNoneSignatureType)},
		{"payload changed after signing", swapPayload(user.Token, claims(nil))},
	}
	for _, f := range forged {
		t.Run(f.name, func(t *testing.T) {
			if status, body := e.chatStatus(t, "Bearer "+f.token); status != http.StatusUnauthorized || string(body) != string(bad) {
				t.Errorf("got %d %s, want the one 401", status, body)
			}
		})
	}
}

// swapPayload puts other claims into a signed token, keeping its header
// and signature.
func swapPayload(token string, claims jwt.MapClaims) string {
	parts := strings.Split(token, ".")
	payload, _ := json.Marshal(claims)
	return parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload) + "." + parts[2]
}

// TestSigningKeyRotation checks that a rotated signing key signs new
// tokens within seconds, while the tokens of the old one keep working
// and both are published.
func TestSigningKeyRotation(t *testing.T) {
	e, _, backend := startMinting(t, "")
	old := e.mintWhenKnown(t, backend, map[string]any{"user": "alice", "tier": "webplus"})
	kidOf := func(token string) string {
		tok, _, err := jwt.NewParser().ParseUnverified(token, jwt.MapClaims{})
		if err != nil {
			t.Fatal(err)
		}
		return tok.Header["kid"].(string)
	}
	out := e.cli(t, "signing-key", "rotate")
	newKID := regexp.MustCompile(`sig_[0-9A-Za-z]{16}`).FindString(out)
	if newKID == "" || newKID == kidOf(old.Token) {
		t.Fatalf("signing-key rotate printed %q, want a new key ID", out)
	}
	waitFor(t, 5*time.Second, "new tokens are signed with the new key, once published for 2s", func() bool {
		return kidOf(e.mint(t, backend, map[string]any{"user": "bob", "tier": "webplus"}).Token) == newKID
	})
	if status, body := e.chatStatus(t, "Bearer "+old.Token); status != http.StatusOK {
		t.Errorf("a token of the old key after the rotation: %d %s", status, body)
	}
	var jwks jose.JSONWebKeySet
	if err := json.NewDecoder(e.do(t, http.MethodGet, "/vigthoria/jwks.json", nil, nil).Body).Decode(&jwks); err != nil {
		t.Fatal(err)
	}
	if len(jwks.Key(newKID)) != 1 || len(jwks.Key(kidOf(old.Token))) != 1 {
		t.Errorf("the JWKS holds %d keys, want the new and the old one", len(jwks.Keys))
	}
}

// TestFleetMintedTokens mints on one instance and calls with the token
// on the other, sharing one Redis; concurrent first mints on both make
// at most one signing key each, all of them verifying everywhere.
func TestFleetMintedTokens(t *testing.T) {
	f := startFleet(t, "requests 1000/1h")
	// The fleet's key may mint tokens of its own tier.
	id := f.addMintingKey(t)
	var wg sync.WaitGroup
	tokens := make([]string, 2)
	for i, c := range []string{f.a.URL, f.b.URL} {
		wg.Go(func() { tokens[i] = fleetMint(t, c, id) })
	}
	wg.Wait()
	for i, c := range []string{f.b.URL, f.a.URL} {
		if tokens[i] == "" {
			t.Fatalf("no token was minted on instance %d", i+1)
		}
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, c+"/v1/chat/completions",
			jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}}))
		req.Header.Set("Authorization", "Bearer "+tokens[i])
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Errorf("a token minted on one instance, used on the other: %d %s", res.StatusCode, body)
		}
	}
}

// addMintingKey adds a key of the fleet's tier that may mint tokens of
// it, and returns its secret.
func (f *fleet) addMintingKey(t *testing.T) string {
	t.Helper()
	st, err := redisstore.Open(f.redis.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	_, secret, err := keystore.Create(t.Context(), st, keystore.Attrs{Name: "backend", Tier: "metered", Mint: []string{"metered"}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return secret
}

// fleetMint mints a token on the instance at base, once it knows key,
// trying for up to two seconds; "" when it did not. It may run in a
// goroutine of its own.
func fleetMint(t *testing.T, base, key string) string {
	var token string
	try := func() bool {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/vigthoria/tokens", jsonBody(map[string]any{"user": "alice"}))
		req.Header.Set("Authorization", "Bearer "+key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		defer res.Body.Close()
		var m mintedToken
		if res.StatusCode != http.StatusCreated || json.NewDecoder(res.Body).Decode(&m) != nil {
			return false
		}
		token = m.Token
		return true
	}
	for deadline := time.Now().Add(2 * time.Second); !try() && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	return token
}
