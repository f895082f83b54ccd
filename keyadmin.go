package vigthoria

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/strictjson"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// serviceFor returns the started Service that a request manages: the one
// of its ?store= parameter, else the only one.
func serviceFor(r *http.Request) (*keys.Service, error) {
	started := keys.Started()
	if want := r.URL.Query().Get("store"); strings.HasPrefix(want, "id:") {
		for _, s := range started {
			if store.SpecID(s.Spec()) == want {
				return s, nil
			}
		}
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound,
			Err: fmt.Errorf("no running vigthoria handler uses the key store %s", want)}
	} else if want != "" {
		kind, target, err := store.ParseSpec(want)
		if err != nil {
			return nil, caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
		}
		for _, s := range started {
			if s.Spec() == kind+":"+target {
				return s, nil
			}
		}
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound,
			Err: fmt.Errorf("no running vigthoria handler uses the key store %s", store.Display(kind, target))}
	}
	var specs []string
	var found *keys.Service
	for _, s := range started {
		if !slices.Contains(specs, s.Name()) {
			specs = append(specs, s.Name())
		}
		found = s
	}
	switch len(specs) {
	case 0:
		return nil, caddy.APIError{HTTPStatus: http.StatusServiceUnavailable,
			Err: errors.New("no key store is open: the running config has no vigthoria handler, or it has not started; `caddy vigthoria key … --store <spec>` works on the store directly")}
	case 1:
		return found, nil
	}
	slices.Sort(specs)
	return nil, caddy.APIError{HTTPStatus: http.StatusBadRequest,
		Err: fmt.Errorf("several key stores are open (%s): choose one with ?store=<spec>", strings.Join(specs, ", "))}
}

// adminAPI serves key management on Caddy's admin API:
//
//	GET    /vigthoria/keys               list keys (never secrets or hashes)
//	POST   /vigthoria/keys               create: {"name": "…", "tier": "…", "expires": "720h", "mint": ["free"], "force": false, <settings>}; the answer holds the secret
//	GET    /vigthoria/keys/{id}          one key
//	PATCH  /vigthoria/keys/{id}          change its settings: {"budget": {"n": 80000000, "period": "month"}, "requests": null}
//	DELETE /vigthoria/keys/{id}          revoke
//	POST   /vigthoria/keys/{id}/rotate   new secret, in the answer
//
// Settings are a JSON object of the fields of Settings, each optional:
// "requests" and "tokens" {"n": 100, "window": "1m", "burst": 10},
// "concurrent" and "max_tokens" numbers, "quota" {"n": tokens, "period":
// "day"|"month"}, "budget" {"n": micro-units of the currency, "period":
// …}, "models" and "origins" lists of strings. A PATCH changes the fields
// it sets, clears those it sets to null (they follow the tier again) and
// keeps the others. POST takes them flat too, beside the attributes, so
// that a key is made and changed with one shape; its nested "settings"
// object of before is still read, but deprecated.
//
// POST refuses a tier (or a mint tier) that no loaded config using the
// store has, unless "force" is true: the key would be refused with 403.
//
//	GET    /vigthoria/usage?key=ID&from=YYYY-MM-DD&to=YYYY-MM-DD
//
// answers the ledger's daily rows of the key (default: every key in the
// store) from day from to day to, both included (default: this month,
// UTC), with each key's name, after writing what the ledger holds.
//
// When several key stores are open, ?store=<spec> chooses one.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.vigthoria",
		New: func() caddy.Module { return adminAPI{} },
	}
}

// Routes returns the admin routes under /vigthoria/.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/vigthoria/", Handler: caddy.AdminHandlerFunc(a.serve)}}
}

// maxAdminBody bounds the body of a key creation.
const maxAdminBody = 64 << 10

// serve routes a request under /vigthoria/.
func (a adminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/vigthoria/"), "/")
	switch {
	case len(parts) == 1 && parts[0] == "keys":
		switch r.Method {
		case http.MethodGet:
			return a.list(w, r)
		case http.MethodPost:
			return a.create(w, r)
		}
		return methodNotAllowed(w, r, http.MethodGet, http.MethodPost)
	case len(parts) == 2 && parts[0] == "keys" && parts[1] != "":
		switch r.Method {
		case http.MethodGet:
			return a.get(w, r, parts[1])
		case http.MethodDelete:
			return a.revoke(w, r, parts[1])
		case http.MethodPatch:
			return a.patch(w, r, parts[1])
		}
		return methodNotAllowed(w, r, http.MethodGet, http.MethodPatch, http.MethodDelete)
	case len(parts) == 1 && parts[0] == "usage":
		if r.Method != http.MethodGet {
			return methodNotAllowed(w, r, http.MethodGet)
		}
		return a.usage(w, r)
	case len(parts) == 3 && parts[0] == "keys" && parts[1] != "" && parts[2] == "rotate":
		if r.Method != http.MethodPost {
			return methodNotAllowed(w, r, http.MethodPost)
		}
		return a.rotate(w, r, parts[1])
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("resource not found: %s", r.URL.Path)}
}

func (adminAPI) list(w http.ResponseWriter, r *http.Request) error {
	svc, err := serviceFor(r)
	if err != nil {
		return err
	}
	recs, err := svc.Store().List(r.Context())
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	now := time.Now()
	infos := make([]keys.KeyInfo, 0, len(recs))
	for _, rec := range recs {
		infos = append(infos, keys.NewKeyInfo(rec, now))
	}
	return writeJSON(w, http.StatusOK, infos)
}

// createAttrs are the attributes of POST /vigthoria/keys besides the
// settings, which come flat beside them.
type createAttrs struct {
	Name    string   `json:"name"`
	Tier    string   `json:"tier"`
	Expires string   `json:"expires"`
	Mint    []string `json:"mint"`
	Force   bool     `json:"force"`
}

// createExample is the body that a refused creation is shown.
const createExample = `{"name": "…", "tier": "…", "expires": "720h", "mint": ["free"], "requests": {"n": 100, "window": "1m"}}`

// parseCreate reads the body of a key creation: the attributes, and the
// settings flat beside them, as PATCH takes them. A nested "settings"
// object, the shape before, is still read (deprecated), but not both.
func parseCreate(body map[string]json.RawMessage) (createAttrs, policy.Settings, error) {
	var a createAttrs
	var s policy.Settings
	attrs, flat := map[string]json.RawMessage{}, map[string]json.RawMessage{}
	for k, v := range body {
		switch k {
		case "name", "tier", "expires", "mint", "force":
			attrs[k] = v
		case "settings":
		default:
			if policy.FieldIndex(k) < 0 {
				return a, s, fmt.Errorf("unknown field '%s'", k)
			}
			flat[k] = v
		}
	}
	b, _ := json.Marshal(attrs)
	if err := strictjson.Unmarshal(b, &a); err != nil {
		return a, s, err
	}
	if nested, ok := body["settings"]; ok {
		if len(flat) > 0 {
			return a, s, errors.New(`settings given both flat and in "settings": give them flat`)
		}
		// Decoded as the object's field, so that an error names its
		// path (settings.Concurrent).
		var wrapped struct {
			Settings policy.Settings `json:"settings"`
		}
		b, _ := json.Marshal(map[string]json.RawMessage{"settings": nested})
		if err := strictjson.Unmarshal(b, &wrapped); err != nil {
			return a, s, err
		}
		return a, wrapped.Settings, nil
	}
	return a, s, policy.PatchSettings(&s, flat)
}

func (adminAPI) create(w http.ResponseWriter, r *http.Request) error {
	var body map[string]json.RawMessage
	err := decodeBody(w, r, &body)
	var req createAttrs
	var settings policy.Settings
	if err == nil {
		req, settings, err = parseCreate(body)
	}
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest,
			Err: fmt.Errorf("decoding request body: %w; send %s", err, createExample)}
	}
	now := time.Now()
	expires, err := parseExpiry(req.Expires, now)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	svc, err := serviceFor(r)
	if err != nil {
		return err
	}
	if !req.Force {
		if err := knownTiers(svc, req.Tier, req.Mint); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
		}
	}
	out, err := svc.CreateKey(r.Context(), keys.Attrs{Name: req.Name, Tier: req.Tier, Expires: expires, Mint: req.Mint, Settings: settings}, now)
	if err != nil {
		return storeError(err)
	}
	return writeJSON(w, http.StatusCreated, out)
}

// knownTiers returns an error unless every loaded config's handler using
// svc knows tier and the tiers of mint: a key of another tier is refused
// with 403, which an operator's typo should not wait for.
func knownTiers(svc *keys.Service, tier string, mint []string) error {
	configured := svc.ConfiguredTiers()
	have := strings.Join(configured, ", ")
	if have == "" {
		have = "none"
	}
	for _, t := range append([]string{tier}, mint...) {
		if t != "" && !slices.Contains(configured, t) {
			return fmt.Errorf("%w: no loaded config has the tier '%s' (its tiers: %s), so its keys would be refused; give \"force\": true (the CLI's --force) to store it anyway",
				store.ErrInvalid, t, have)
		}
	}
	return nil
}

func (adminAPI) get(w http.ResponseWriter, r *http.Request, id string) error {
	svc, err := serviceFor(r)
	if err != nil {
		return err
	}
	rec, err := svc.Store().Get(r.Context(), id)
	if err != nil {
		return storeError(err)
	}
	return writeJSON(w, http.StatusOK, keys.NewKeyInfo(rec, time.Now()))
}

// patch changes the settings of the key id; see adminAPI.
func (adminAPI) patch(w http.ResponseWriter, r *http.Request, id string) error {
	var patch map[string]json.RawMessage
	if err := decodeBody(w, r, &patch); err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest,
			Err: fmt.Errorf(`decoding request body: %w; send the settings to change, null to clear one: {"budget": {"n": 80000000, "period": "month"}, "requests": null}`, err)}
	}
	svc, err := serviceFor(r)
	if err != nil {
		return err
	}
	out, err := svc.PatchKey(r.Context(), id, patch, time.Now())
	if err != nil {
		return storeError(err)
	}
	return writeJSON(w, http.StatusOK, out)
}

func (adminAPI) revoke(w http.ResponseWriter, r *http.Request, id string) error {
	svc, err := serviceFor(r)
	if err != nil {
		return err
	}
	out, err := svc.RevokeKey(r.Context(), id, time.Now())
	if err != nil {
		return storeError(err)
	}
	return writeJSON(w, http.StatusOK, out)
}

func (adminAPI) rotate(w http.ResponseWriter, r *http.Request, id string) error {
	svc, err := serviceFor(r)
	if err != nil {
		return err
	}
	out, err := svc.RotateKey(r.Context(), id, time.Now())
	if err != nil {
		return storeError(err)
	}
	return writeJSON(w, http.StatusOK, out)
}

// usage answers the ledger's rows; see adminAPI.
func (adminAPI) usage(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	from, to, err := usageRange(q.Get("from"), q.Get("to"), time.Now())
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	svc, err := serviceFor(r)
	if err != nil {
		return err
	}
	// What the ledger holds in memory goes to the store first, so that the
	// answer holds every request answered until now.
	if err := svc.Ledger().Flush(r.Context()); err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: fmt.Errorf("writing the usage ledger: %w", err)}
	}
	var ids []string
	if id := q.Get("key"); id != "" {
		ids = []string{id}
	}
	rows, err := usageLines(r.Context(), svc.Store(), ids, from, to)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	return writeJSON(w, http.StatusOK, rows)
}

// decodeBody reads the request's JSON body into v strictly: a field not
// named exactly as documented is refused, not ignored.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAdminBody))
	if err != nil {
		return err
	}
	return strictjson.Unmarshal(body, v)
}

// storeError maps a store or Create error to its status.
func storeError(err error) error {
	return caddy.APIError{HTTPStatus: keys.ErrorStatus(err), Err: err}
}

func methodNotAllowed(w http.ResponseWriter, r *http.Request, allowed ...string) error {
	w.Header().Set("Allow", strings.Join(allowed, ", "))
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed,
		Err: fmt.Errorf("method %s not allowed on %s: use %s", r.Method, r.URL.Path, strings.Join(allowed, " or "))}
}

// writeJSON writes v with status. Answers may hold a secret: no cache
// may keep them.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n')) // the client has gone; nothing to tell it
	return nil
}

// Interface guards
var (
	_ caddy.Module      = adminAPI{}
	_ caddy.AdminRouter = adminAPI{}
)
