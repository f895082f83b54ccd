package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/vigthoria/caddy-vigthoria/api"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// DefaultModelsTTL is how long the model list is served from the cache.
const DefaultModelsTTL = 5 * time.Minute

// fetchTimeout bounds one upstream fetch of the model list; it is shared
// by every caller waiting on it, so no caller's own deadline applies.
const fetchTimeout = 30 * time.Second

// The model lists of all configs, by what they depend on (see
// modelsKey): one small LRU without a goroutine of its own, shared across
// config reloads, so that a reload neither loses the list nor leaves
// anything running.
var (
	modelLists, _ = lru.New[string, *modelList](256)
	modelFlights  singleflight.Group
)

// modelsShapers are the request headers that go upstream and may change
// its model list; the operator's upstream_headers are added to them.
// The others that go upstream (User-Agent, request IDs, trace context)
// describe one caller, and stay out of the fetch that serves many.
var modelsShapers = [...]string{"Accept", "Accept-Language", "Openai-Beta"}

// modelsKey names the model list a request with h gets: the upstream's
// URL and server key, by their fingerprint, since an account may have
// models of its own, and the values of the headers that may change the
// answer (modelsShapers and the operator's upstream_headers), each
// prefixed by its length so that no two sets join alike.
func (up *Upstream) modelsKey(h http.Header) string { return up.modelsKeyOf(up.tenant, h) }

// modelsKeyOf is modelsKey for the server key of tenant.
func (up *Upstream) modelsKeyOf(tenant string, h http.Header) string {
	var buf [128]byte
	b := append(buf[:0], tenant...)
	for _, name := range up.modelsHeaders {
		for _, v := range h[name] {
			b = append(b, 0)
			b = append(b, name...)
			b = strconv.AppendInt(append(b, ':'), int64(len(v)), 10)
			b = append(append(b, ':'), v...)
		}
	}
	if len(b) == len(tenant) {
		return tenant
	}
	return string(b)
}

// modelsRequestHeader is what of h goes with the fetch of the list: the
// headers modelsKey names it by, and nothing else.
func (up *Upstream) modelsRequestHeader(h http.Header) http.Header {
	out := make(http.Header, len(up.modelsHeaders))
	for _, name := range up.modelsHeaders {
		if v, ok := h[name]; ok {
			out[name] = v
		}
	}
	return out
}

// PurgeModels forgets every cached model list.
func PurgeModels() { modelLists.Purge() }

// modelList is one upstream's answer to GET /models, and its versions
// filtered per tier, made when first asked for.
type modelList struct {
	body    []byte
	fetched time.Time
	ids     map[string]struct{} // the models listed, at most maxListed

	mu       sync.Mutex // protects filtered
	filtered map[string]filteredList
}

type filteredList struct {
	body []byte
	etag string
}

// ModelFilter says which models a caller may see. Filtered lists are kept
// per Key, so Key must name the policy itself, never who holds it: two
// tiers of one name in two sites may allow different models. FilterKey
// makes one from the policy's globs.
type ModelFilter struct {
	Key    string
	Allows func(model string) bool
}

// FilterKey names the model policy of globs: the same for the same set of
// globs in any order, different for any other set, "" for none (every
// model). It is meant to be made once, when the policy is configured.
func FilterKey(globs []string) string {
	if len(globs) == 0 {
		return ""
	}
	sorted := slices.Clone(globs)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	var b []byte
	for i, g := range sorted {
		if i > 0 {
			b = append(b, ',')
		}
		b = strconv.AppendQuote(b, g) // quoted: no two sets join alike
	}
	return string(b)
}

// ServeModels answers GET /v1/models from the cache when it holds a list
// younger than ttl, fetching it once for all concurrent callers when not.
// When the upstream fails and an older list exists, that list is served,
// marked stale. The list is filtered to what the caller's tier allows, and
// If-None-Match is answered with 304.
func (up *Upstream) ServeModels(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, ttl time.Duration, f ModelFilter, c *Call) error {
	now := time.Now()
	// The list of the key the pool picks for a request of no model: keys
	// of one upstream may list different models, and a list is cached
	// per key. A key refused while fetching is out of the pool: the
	// next key is asked, as a request would be.
	var list *modelList
	var ok bool
	status := "HIT"
	for range up.pool.keys {
		k, err := up.pool.pick("", now)
		if err != nil {
			return errUpstreamAuth
		}
		key := up.modelsKeyOf(k.tenant, r.Header)
		if list, ok = modelLists.Get(key); ok && now.Sub(list.fetched) < ttl {
			break
		}
		fresh, err := up.fetchModels(r, key, next, k)
		if err == errUpstreamAuth && k.down.Load() {
			list, ok = nil, false
			continue
		}
		switch {
		case err == nil:
			list, status = fresh, "MISS"
		case ok:
			status = "STALE"
			w.Header().Set("Warning", `110 - "Response is Stale"`)
		default:
			var passed *passThrough
			if errors.As(err, &passed) {
				return passed.write(w)
			}
			return err
		}
		break
	}
	if list == nil {
		return errUpstreamAuth
	}
	c.Usage.Cache = status
	if status == "MISS" {
		c.Usage.Status = http.StatusOK
	}
	fl := list.filter(f)
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Etag", fl.etag)
	h.Set("Age", strconv.FormatInt(int64(now.Sub(list.fetched)/time.Second), 10))
	h.Set("Cache-Control", "private, max-age="+strconv.FormatInt(int64(max(ttl-now.Sub(list.fetched), 0)/time.Second), 10))
	h.Set("X-Cache", status)
	if match := r.Header.Get("If-None-Match"); match != "" && match == fl.etag {
		w.WriteHeader(http.StatusNotModified)
		return nil
	}
	h.Set("Content-Length", strconv.Itoa(len(fl.body)))
	_, err := w.Write(fl.body)
	return err
}

// fetchModels asks the upstream for the model list named key, once for
// all callers waiting at the same time, and caches a 200.
func (up *Upstream) fetchModels(r *http.Request, key string, next caddyhttp.Handler, k *poolKey) (*modelList, error) {
	v, err, _ := modelFlights.Do(key, func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), fetchTimeout)
		defer cancel()
		req := r.Clone(ctx)
		req.Method, req.Body, req.ContentLength = http.MethodGet, nil, 0
		req.Header = up.modelsRequestHeader(r.Header)
		rec := &recorder{header: make(http.Header)}
		c := &Call{key: k}
		if err := up.Forward(rec, req, &api.Endpoints[api.Models], next, c); err != nil {
			return nil, err
		}
		if rec.over {
			up.logger.Warn("upstream model list over 8 MiB; refused", zap.Int("status", rec.status))
			return nil, errUpstreamBadAnswer
		}
		if rec.status != http.StatusOK {
			return nil, &passThrough{status: rec.status, header: rec.header, body: rec.body.Bytes()}
		}
		body := rec.body.Bytes()
		list := &modelList{body: body, fetched: time.Now(), ids: listedIDs(body), filtered: make(map[string]filteredList)}
		up.listed.Store(&list.ids)
		modelLists.Add(key, list)
		return list, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*modelList), nil
}

// maxListed bounds the model names kept from one upstream's list: they
// are metric labels.
const maxListed = 1000

// listedIDs are the model IDs of a GET /models answer, the first
// maxListed of them; none when the body cannot be read.
func listedIDs(body []byte) map[string]struct{} {
	var doc struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if json.Unmarshal(body, &doc) != nil {
		return nil
	}
	ids := make(map[string]struct{}, min(len(doc.Data), maxListed))
	for _, m := range doc.Data {
		if len(ids) == maxListed {
			break
		}
		ids[m.ID] = struct{}{}
	}
	return ids
}

// Listed reports whether the upstream's last fetched model list, of any
// variant the request headers shape, names model. It fetches nothing:
// before a caller asked for the list, or with the cache off, no model is
// listed.
func (up *Upstream) Listed(model string) bool {
	ids := up.listed.Load()
	if ids == nil {
		return false
	}
	_, listed := (*ids)[model]
	return listed
}

// filter returns the list as a caller with f sees it.
func (l *modelList) filter(f ModelFilter) filteredList {
	l.mu.Lock()
	defer l.mu.Unlock()
	if fl, ok := l.filtered[f.Key]; ok {
		return fl
	}
	body := l.body
	if f.Allows != nil {
		body = filterModels(l.body, f.Allows)
	}
	sum := sha256.Sum256(body)
	fl := filteredList{body: body, etag: `"` + hex.EncodeToString(sum[:12]) + `"`}
	l.filtered[f.Key] = fl
	return fl
}

// filterModels keeps the entries of data whose id allows accepts, and
// every other field as it was; a body it cannot read passes unchanged.
func filterModels(body []byte, allows func(string) bool) []byte {
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(body, &doc); err != nil {
		return body
	}
	var data []json.RawMessage
	if err := json.Unmarshal(doc["data"], &data); err != nil {
		return body
	}
	kept := make([]json.RawMessage, 0, len(data))
	for _, m := range data {
		var id struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(m, &id) == nil && allows(id.ID) {
			kept = append(kept, m)
		}
	}
	raw, err := json.Marshal(kept)
	if err != nil {
		return body
	}
	doc["data"] = raw
	out, err := json.Marshal(doc)
	if err != nil {
		return body
	}
	return out
}

// passThrough is an upstream answer other than 200, passed to the caller
// as it came, since no cached list can stand in for it.
type passThrough struct {
	status int
	header http.Header
	body   []byte
}

func (p *passThrough) Error() string { return "upstream answered " + strconv.Itoa(p.status) }

func (p *passThrough) write(w http.ResponseWriter) error {
	for k, v := range p.header {
		w.Header()[k] = v
	}
	w.WriteHeader(p.status)
	_, err := w.Write(p.body)
	return err
}

// maxModelList bounds the model list kept from the upstream: the largest
// known (an aggregator's hundreds of models, described) are a few MiB.
const maxModelList = 8 << 20

// recorder is the ResponseWriter of a fetch the proxy makes for itself.
// It keeps at most maxModelList bytes of the body, and reads the rest
// through, for its usage, as any answer is.
type recorder struct {
	header http.Header
	status int
	body   bytes.Buffer
	over   bool // the body passed maxModelList
}

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
}

func (r *recorder) Write(b []byte) (int, error) {
	r.WriteHeader(http.StatusOK)
	if r.over = r.over || r.body.Len()+len(b) > maxModelList; r.over {
		r.body = bytes.Buffer{}
		return len(b), nil
	}
	return r.body.Write(b)
}

func (r *recorder) Flush() {}
