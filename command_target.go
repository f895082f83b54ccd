package vigthoria

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// keyTarget is where the key commands work: the admin API of a running
// Caddy (the default), whose Service applies a change before it answers,
// or a store opened directly with --store, for offline use.
type keyTarget struct {
	admin string        // the admin API's address, when through it
	store string        // with admin: the ?store= spec, if given
	st    store.Backend // without admin: the store opened
	name  string        // where the keys are, for messages
}

// online reports whether the target is a running Caddy.
func (t *keyTarget) online() bool { return t.admin != "" }

// close closes a store opened directly.
func (t *keyTarget) close() {
	if t.st != nil {
		t.st.Close()
	}
}

// cliTarget returns the target of a key command: the store of --store
// opened directly, unless --address is given too (then that store of
// the Caddy there); else the admin API at --address, or at the admin
// address of the --config file, or Caddy's default, as `caddy reload`
// finds it. Only create makes a new SQLite file.
func cliTarget(cmd *cobra.Command, create bool) (*keyTarget, error) {
	spec, _ := cmd.Flags().GetString("store")
	address, _ := cmd.Flags().GetString("address")
	config, _ := cmd.Flags().GetString("config")
	if spec != "" && address == "" {
		st, name, err := openStore(cmd, spec, create)
		if err != nil {
			return nil, err
		}
		return &keyTarget{st: st, name: name}, nil
	}
	addr, err := caddycmd.DetermineAdminAPIAddress(address, nil, config, "")
	if err != nil {
		return nil, fmt.Errorf("finding the admin API's address: %w", err)
	}
	if spec != "" {
		// Canonical here: a relative SQLite path is the caller's, not
		// relative to Caddy's working directory. Sent as its ID: the
		// admin API logs every URI, and a Redis URL may hold a password.
		kind, target, err := store.ParseSpec(spec)
		if err != nil {
			return nil, err
		}
		spec = store.SpecID(kind + ":" + target)
	}
	return &keyTarget{admin: addr, store: spec, name: "the key store of the Caddy at " + addr}, nil
}

// openStore opens the store spec. Only create makes a new SQLite file: a
// mistyped path should not look like an empty store.
func openStore(cmd *cobra.Command, spec string, create bool) (store.Backend, string, error) {
	kind, target, err := store.ParseSpec(spec)
	if err != nil {
		return nil, "", err
	}
	if kind == "sqlite" {
		_, statErr := os.Stat(target)
		isNew := errors.Is(statErr, os.ErrNotExist)
		if isNew && !create {
			return nil, "", fmt.Errorf("no key store at %s: give the store of your Caddyfile with --store sqlite:PATH", target)
		}
		if isNew && os.Geteuid() == 0 {
			// The file is made -rw------- for its owner, as a store of
			// keys should be: a Caddy running as another user then fails
			// to open it with "permission denied".
			fmt.Fprintf(cmd.ErrOrStderr(), "Warning: creating %s as root: a Caddy running as another user cannot open it. "+
				"Run the command as Caddy's user (sudo -u caddy caddy vigthoria … --store sqlite:%s), "+
				"use the running Caddy's admin API (no --store), or chown the file and its directory to Caddy's user.\n", target, target)
		}
	}
	st, err := store.Open(spec)
	return st, store.Display(kind, target), err
}

// call makes a request of the admin API and decodes its JSON answer into
// out. An unreachable admin API gets an error naming both ways to the
// keys; a refusal, the admin API's own words.
func (t *keyTarget) call(method, path string, query url.Values, body, out any) error {
	if t.store != "" {
		if query == nil {
			query = url.Values{}
		}
		query.Set("store", t.store)
	}
	uri := path
	if len(query) > 0 {
		uri += "?" + query.Encode()
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	res, err := caddycmd.AdminAPIRequest(t.admin, method, uri, nil, rd)
	if err != nil {
		return adminError(t.admin, err)
	}
	defer res.Body.Close()
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(res.Body).Decode(out); err != nil {
		return fmt.Errorf("reading the admin API's answer: %w", err)
	}
	return nil
}

// adminError rewords an error of caddycmd.AdminAPIRequest: the admin API
// unreachable, or its error message.
func adminError(addr string, err error) error {
	msg := err.Error()
	const refused = "caddy responded with error: "
	i := strings.Index(msg, refused)
	if i < 0 {
		if strings.HasPrefix(msg, "performing request") {
			return fmt.Errorf("no Caddy admin API answers at %s (%v): start Caddy with the vigthoria handler, "+
				"give its admin address with --address (or its config with --config), "+
				"or work on the key store directly with --store sqlite:PATH or --store redis://HOST:PORT/DB", addr, err)
		}
		return err
	}
	rest := msg[i+len(refused):] // HTTP 400: {"error":"…"}
	if j := strings.Index(rest, ": "); j >= 0 {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal([]byte(rest[j+2:]), &e) == nil && e.Error != "" {
			return fmt.Errorf("the running Caddy refused: %s", e.Error)
		}
	}
	return errors.New(msg[i:])
}

// createKey adds a key. Offline, the tier cannot be checked against a
// running config: with config (a Caddyfile or JSON), it is checked
// against that one's.
func (t *keyTarget) createKey(ctx context.Context, a createAttrs, s policy.Settings, config string) (keys.KeyInfo, error) {
	if t.online() {
		body := map[string]any{"name": a.Name, "tier": a.Tier, "expires": a.Expires, "mint": a.Mint, "force": a.Force}
		b, _ := json.Marshal(s)
		var flat map[string]json.RawMessage
		_ = json.Unmarshal(b, &flat)
		for k, v := range flat {
			body[k] = v
		}
		var out keys.KeyInfo
		return out, t.call(http.MethodPost, "/vigthoria/keys", nil, body, &out)
	}
	if config != "" && !a.Force {
		if err := configHasTiers(config, append([]string{a.Tier}, a.Mint...)); err != nil {
			return keys.KeyInfo{}, err
		}
	}
	now := time.Now()
	expires, err := parseExpiry(a.Expires, now)
	if err != nil {
		return keys.KeyInfo{}, err
	}
	rec, secret, err := keys.Create(ctx, t.st, keys.Attrs{Name: a.Name, Tier: a.Tier, Expires: expires, Mint: a.Mint, Settings: s}, now)
	if err != nil {
		return keys.KeyInfo{}, err
	}
	out := keys.NewKeyInfo(rec, now)
	out.Secret = secret
	return out, nil
}

func (t *keyTarget) listKeys(ctx context.Context) ([]keys.KeyInfo, error) {
	var out []keys.KeyInfo
	if t.online() {
		return out, t.call(http.MethodGet, "/vigthoria/keys", nil, nil, &out)
	}
	recs, err := t.st.List(ctx)
	now := time.Now()
	for _, r := range recs {
		out = append(out, keys.NewKeyInfo(r, now))
	}
	return out, err
}

func (t *keyTarget) getKey(ctx context.Context, id string) (keys.KeyInfo, error) {
	var out keys.KeyInfo
	if t.online() {
		return out, t.call(http.MethodGet, "/vigthoria/keys/"+url.PathEscape(id), nil, nil, &out)
	}
	rec, err := t.st.Get(ctx, id)
	return keys.NewKeyInfo(rec, time.Now()), err
}

// patchKey changes the key's settings by a JSON object of settings, null
// clearing one (see adminAPI).
func (t *keyTarget) patchKey(ctx context.Context, id string, patch map[string]json.RawMessage) (keys.KeyInfo, error) {
	var out keys.KeyInfo
	if t.online() {
		return out, t.call(http.MethodPatch, "/vigthoria/keys/"+url.PathEscape(id), nil, patch, &out)
	}
	rec, err := t.st.Get(ctx, id)
	if err != nil {
		return out, err
	}
	if err := policy.PatchSettings(&rec.Settings, patch); err != nil {
		return out, err
	}
	if err := keys.SetSettings(ctx, t.st, id, rec.Settings); err != nil {
		return out, err
	}
	return keys.NewKeyInfo(rec, time.Now()), nil
}

func (t *keyTarget) revokeKey(ctx context.Context, id string) error {
	if t.online() {
		return t.call(http.MethodDelete, "/vigthoria/keys/"+url.PathEscape(id), nil, nil, nil)
	}
	return t.st.Revoke(ctx, id, time.Now())
}

func (t *keyTarget) rotateKey(ctx context.Context, id string) (string, error) {
	if t.online() {
		var out keys.KeyInfo
		err := t.call(http.MethodPost, "/vigthoria/keys/"+url.PathEscape(id)+"/rotate", nil, nil, &out)
		return out.Secret, err
	}
	return keys.Rotate(ctx, t.st, id)
}

// usage returns the ledger's rows of the key id (every key when ""),
// from day from to day to, both included.
func (t *keyTarget) usage(ctx context.Context, id, from, to string) ([]usageLine, error) {
	if t.online() {
		q := url.Values{"from": {from}, "to": {to}}
		if id != "" {
			q.Set("key", id)
		}
		var out []usageLine
		return out, t.call(http.MethodGet, "/vigthoria/usage", q, nil, &out)
	}
	var ids []string
	if id != "" {
		ids = []string{id}
	}
	return usageLines(ctx, t.st, ids, from, to)
}
