package dashboard

import (
	"cmp"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/caller/keys"
	"github.com/vigthoria/caddy-vigthoria/internal/strictjson"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/store"
)

// pageSize is how many keys one page of api/keys holds.
const pageSize = 50

// maxBody bounds the body of a change.
const maxBody = 64 << 10

// topKeys is how many keys the overview ranks.
const topKeys = 10

// serveAPI routes a request under api/:
//
//	GET    overview?range=24h|30d   usage over time (24 h by 5 minutes, 30 days by day) by tier and by model,
//	                                requests by outcome, the top keys; refusals by reason
//	GET    live                     requests/s, refusals/s, streams; refusals by reason
//	GET    keys?q=&tier=&sort=&desc=&page=   keys with their limits and usage
//	POST   keys                     create: {"name", "tier", "expires", "settings"}; the answer holds the secret
//	GET    keys/{id}                one key, its usage by 5 minutes, day and model, its refusals by reason
//	PATCH  keys/{id}                change its settings (null clears one)
//	DELETE keys/{id}                revoke
//	POST   keys/{id}/rotate         new secret, in the answer
func (h *Handler) serveAPI(w http.ResponseWriter, r *http.Request, route, user string) error {
	if status, why := h.checkRequest(r, user); status != 0 {
		return writeError(w, status, why)
	}
	if err := h.keys.Start(); err != nil {
		h.logger.Error("the key store is unavailable", zap.Error(err))
		return writeError(w, http.StatusServiceUnavailable, "the key store is unavailable")
	}
	now := time.Now()
	parts := strings.Split(route, "/")
	switch {
	case route == "overview" && r.Method == http.MethodGet:
		return h.overview(w, r, now)
	case route == "live" && r.Method == http.MethodGet:
		return writeJSON(w, http.StatusOK, h.live.report(now))
	case route == "keys" && r.Method == http.MethodGet:
		return h.listKeys(w, r, now)
	case route == "keys" && r.Method == http.MethodPost:
		return h.create(w, r, user, now)
	case len(parts) == 2 && parts[0] == "keys" && parts[1] != "":
		switch r.Method {
		case http.MethodGet:
			return h.key(w, r, parts[1], now)
		case http.MethodPatch:
			var patch map[string]json.RawMessage
			if !decode(w, r, &patch) {
				return nil
			}
			out, err := h.keys.PatchKey(r.Context(), parts[1], patch, now)
			return h.changed(w, "settings changed", user, out, err, http.StatusOK)
		case http.MethodDelete:
			out, err := h.keys.RevokeKey(r.Context(), parts[1], now)
			return h.changed(w, "key revoked", user, out, err, http.StatusOK)
		}
	case len(parts) == 3 && parts[0] == "keys" && parts[2] == "rotate" && r.Method == http.MethodPost:
		out, err := h.keys.RotateKey(r.Context(), parts[1], now)
		return h.changed(w, "key rotated", user, out, err, http.StatusOK)
	}
	return writeError(w, http.StatusNotFound, "no such endpoint or method")
}

// create makes a key.
func (h *Handler) create(w http.ResponseWriter, r *http.Request, user string, now time.Time) error {
	var req struct {
		Name     string          `json:"name"`
		Tier     string          `json:"tier"`
		Expires  string          `json:"expires"` // a duration from now, such as 720h; "" for never
		Settings policy.Settings `json:"settings"`
	}
	if !decode(w, r, &req) {
		return nil
	}
	var expires time.Time
	if req.Expires != "" {
		d, err := time.ParseDuration(req.Expires)
		if err != nil || d <= 0 {
			return writeError(w, http.StatusBadRequest, "expires is a duration such as 720h")
		}
		expires = now.Add(d)
	}
	out, err := h.keys.CreateKey(r.Context(), keys.Attrs{Name: req.Name, Tier: req.Tier, Expires: expires, Settings: req.Settings}, now)
	return h.changed(w, "key created", user, out, err, http.StatusCreated)
}

// changed answers a change, and logs it without the secret.
func (h *Handler) changed(w http.ResponseWriter, what, user string, out keys.KeyInfo, err error, status int) error {
	if err != nil {
		return writeError(w, keys.ErrorStatus(err), err.Error())
	}
	h.logger.Info(what, zap.String("key_id", out.ID), zap.String("tier", out.Tier), zap.String("by", user))
	return writeJSON(w, status, out)
}

// series are figures over time: one value per bucket, in total and by a
// label (a tier, a model or a refusal's reason), and for usage by model
// as well.
type series struct {
	Total   []int64            `json:"total"`
	By      map[string][]int64 `json:"by"`
	ByModel map[string][]int64 `json:"by_model,omitempty"`
}

func newSeries(n int) series { return series{Total: make([]int64, n), By: make(map[string][]int64)} }

func (s *series) add(i int, label string, n int64) {
	s.Total[i] += n
	addTo(s.By, len(s.Total), i, label, n)
}

// addModel adds n to the bucket i of model, beside the total and label
// that add counted it in.
func (s *series) addModel(i int, model string, n int64) {
	if s.ByModel == nil {
		s.ByModel = make(map[string][]int64)
	}
	addTo(s.ByModel, len(s.Total), i, model, n)
}

func addTo(m map[string][]int64, buckets, i int, label string, n int64) {
	by := m[label]
	if by == nil {
		by = make([]int64, buckets)
		m[label] = by
	}
	by[i] += n
}

// usageTotals are a sum of usage rows.
type usageTotals struct {
	Requests int64 `json:"requests"`
	Tokens   int64 `json:"tokens"`
	Cost     int64 `json:"cost"` // micro-units
}

func (u *usageTotals) add(r store.UsageRow) {
	u.Requests += r.Requests
	u.Tokens += r.TotalTokens()
	u.Cost += r.Cost
}

// chart is usage over time: buckets from Times[i] (unix seconds) for
// Step seconds.
type chart struct {
	Step     int64   `json:"step"`
	Times    []int64 `json:"times"`
	Requests series  `json:"requests"`
	Tokens   series  `json:"tokens"`
	Cost     series  `json:"cost"`    // micro-units
	Refused  series  `json:"refused"` // by reason: requests of identified callers refused
	// Outcomes are the requests of identified callers by outcome:
	// "served" (answered by the upstream, as the ledger counts them) and
	// each reason of a refusal.
	Outcomes series `json:"outcomes"`
}

// served is the outcome of the requests the ledger counts as used.
const served = "served"

// The ranges a chart can cover.
const (
	range24h = "24h" // the last 24 hours by 5 minutes
	range30d = "30d" // the last 30 days by day
)

// newChart makes the buckets of a range ending at now: 24 hours by 5
// minutes (store.SlotStep), or 30 days by day.
func newChart(rng string, now time.Time) chart {
	step, n := store.SlotStep, int(24*time.Hour/store.SlotStep)
	start := now.UTC().Truncate(step).Add(-time.Duration(n-1) * step)
	if rng == range30d {
		step, n = 24*time.Hour, 30
		start = now.UTC().Truncate(24*time.Hour).AddDate(0, 0, -29)
	}
	c := chart{Step: int64(step / time.Second), Times: make([]int64, n),
		Requests: newSeries(n), Tokens: newSeries(n), Cost: newSeries(n), Refused: newSeries(n), Outcomes: newSeries(n)}
	for i := range n {
		c.Times[i] = start.Add(time.Duration(i) * step).Unix()
	}
	return c
}

// since is the start of the chart's first bucket.
func (c *chart) since() time.Time { return time.Unix(c.Times[0], 0) }

// bucket returns the bucket of a row of the ledger (a 5-minute slot, an
// hour or a day), or -1.
func (c *chart) bucket(at string) int {
	var t time.Time
	var err error
	switch len(at) {
	case len("2006-01-02T15:04"):
		t, err = store.ParseSlot(at)
	case len("2006-01-02T15"):
		t, err = store.ParseHour(at)
	default:
		t, err = time.Parse(time.DateOnly, at)
	}
	if err != nil {
		return -1
	}
	i := (t.Unix() - c.Times[0]) / c.Step
	if t.Unix() < c.Times[0] || i >= int64(len(c.Times)) {
		return -1
	}
	return int(i)
}

// add adds a usage row to the chart, labelled (by tier, say) and by its
// model.
func (c *chart) add(r store.UsageRow, label string) {
	if i := c.bucket(r.Day); i >= 0 {
		c.Requests.add(i, label, r.Requests)
		c.Tokens.add(i, label, r.TotalTokens())
		c.Cost.add(i, label, r.Cost)
		c.Requests.addModel(i, r.Model, r.Requests)
		c.Tokens.addModel(i, r.Model, r.TotalTokens())
		c.Cost.addModel(i, r.Model, r.Cost)
		c.Outcomes.add(i, served, r.Requests)
	}
}

// addRefusals adds the refusal rows to the chart by reason, and returns
// their totals by reason in its range, the most first.
func (c *chart) addRefusals(rows []store.RefusalRow) []reasonTotal {
	totals := make(map[string]int64)
	for _, r := range rows {
		if i := c.bucket(r.Hour); i >= 0 {
			c.Refused.add(i, r.Reason, r.Count)
			c.Outcomes.add(i, r.Reason, r.Count)
			totals[r.Reason] += r.Count
		}
	}
	out := make([]reasonTotal, 0, len(totals))
	for reason, n := range totals {
		out = append(out, reasonTotal{Reason: reason, Count: n})
	}
	slices.SortFunc(out, func(a, b reasonTotal) int {
		return cmp.Or(cmp.Compare(b.Count, a.Count), strings.Compare(a.Reason, b.Reason))
	})
	return out
}

// reasonTotal is the refusals of one reason in a range.
type reasonTotal struct {
	Reason string `json:"reason"`
	Count  int64  `json:"count"`
}

// modelTotals is one model's usage in a range.
type modelTotals struct {
	Model string `json:"model"`
	usageTotals
}

// keyTotals is one key's usage in a range.
type keyTotals struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Tier string `json:"tier"`
	usageTotals
}

// overviewReport is the answer of api/overview.
type overviewReport struct {
	Currency string        `json:"currency,omitempty"`
	Tiers    []string      `json:"tiers"`
	Chart    chart         `json:"chart"`
	Models   []modelTotals `json:"models"`
	Top      []keyTotals   `json:"top"`
	Refusals []reasonTotal `json:"refusals"` // in the range, by reason
}

// overview answers usage over the last 24 hours (by 5 minutes, from the
// ledger's 5-minute rows) or 30 days (by day, from its hourly rows), by
// tier, model, outcome and key, and the refusals by reason.
//
// A client's tier is its key's, as the store has it; a caller without a
// key (a JWT's user, an identity, an anonymous address) has the tier the
// Policy gives it, or "(other)". A minted token's user is counted in its
// minting key's rows, which hold its usage, and not again in its own.
func (h *Handler) overview(w http.ResponseWriter, r *http.Request, now time.Time) error {
	rng := r.URL.Query().Get("range")
	if rng != range30d {
		rng = range24h
	}
	c := newChart(rng, now)
	ledger := h.keys.Ledger()
	usage, refused := ledger.Slots, ledger.RefusalSlots
	if rng == range30d {
		usage, refused = ledger.Hours, ledger.RefusalHours
	}
	rows, err := usage(r.Context(), "", c.since())
	if err != nil {
		return h.unavailable(w, "reading usage", err)
	}
	refusals, err := refused(r.Context(), "", c.since())
	if err != nil {
		return h.unavailable(w, "reading refusals", err)
	}
	recs, err := h.keys.Store().List(r.Context())
	if err != nil {
		return h.unavailable(w, "listing keys", err)
	}
	byID := make(map[string]store.Record, len(recs))
	for _, rec := range recs {
		byID[rec.ID] = rec
	}
	policy := h.source.Policy(h.spec)
	tiers := make(map[string]string) // by client
	models := make(map[string]*usageTotals)
	clients := make(map[string]*usageTotals)
	for _, row := range rows {
		if rng == range30d {
			row.Day = row.Day[:len(time.DateOnly)]
		}
		tier, ok := tiers[row.Client]
		if !ok {
			tier = tierOf(row.Client, byID, policy)
			tiers[row.Client] = tier
		}
		if tier == rolledUp {
			continue
		}
		c.add(row, tier)
		total(models, row.Model).add(row)
		total(clients, row.Client).add(row)
	}
	reasons := c.addRefusals(refusals)
	rep := overviewReport{Chart: c, Models: []modelTotals{}, Top: []keyTotals{}, Refusals: reasons}
	if policy != nil {
		rep.Currency, rep.Tiers = policy.Currency(), policy.Tiers()
	}
	for model, t := range models {
		rep.Models = append(rep.Models, modelTotals{Model: model, usageTotals: *t})
	}
	slices.SortFunc(rep.Models, func(a, b modelTotals) int { return cmp.Compare(b.Tokens, a.Tokens) })
	for id, t := range clients {
		rep.Top = append(rep.Top, keyTotals{ID: id, Name: byID[id].Name, Tier: tiers[id], usageTotals: *t})
	}
	slices.SortFunc(rep.Top, func(a, b keyTotals) int {
		return cmp.Or(cmp.Compare(b.Tokens, a.Tokens), cmp.Compare(b.Requests, a.Requests), strings.Compare(a.ID, b.ID))
	})
	rep.Top = rep.Top[:min(len(rep.Top), topKeys)]
	return writeJSON(w, http.StatusOK, rep)
}

// rolledUp is the "tier" of a client whose usage its minting key's rows
// hold already.
const rolledUp = "\x00rolled up"

// tierOf names the tier a client's rows are charted under: its key's,
// or the one the policy gives a caller without a key, or "(other)"; or
// rolledUp.
func tierOf(client string, keys map[string]store.Record, policy Policy) string {
	if rec, ok := keys[client]; ok {
		return rec.Tier
	}
	if policy != nil {
		tier, counted := policy.Caller(client)
		switch {
		case counted:
			return rolledUp
		case tier != "":
			return tier
		}
	}
	return "(other)"
}

func total(m map[string]*usageTotals, k string) *usageTotals {
	t := m[k]
	if t == nil {
		t = new(usageTotals)
		m[k] = t
	}
	return t
}

// standing is a key's use of a quota or a budget in its period.
type standing struct {
	Period string `json:"period"`
	Limit  int64  `json:"limit"`
	Used   int64  `json:"used"`
}

// keyRow is a key as api/keys lists it.
type keyRow struct {
	keys.KeyInfo
	Limits *Limits     `json:"limits"` // nil: its tier is not configured
	Month  usageTotals `json:"month"`
	Quota  *standing   `json:"quota,omitempty"`
	Budget *standing   `json:"budget,omitempty"` // micro-units
}

// keysReport is the answer of api/keys.
type keysReport struct {
	Total    int      `json:"total"`
	Page     int      `json:"page"`
	PageSize int      `json:"page_size"`
	Currency string   `json:"currency,omitempty"`
	Tiers    []string `json:"tiers"`
	Keys     []keyRow `json:"keys"`
}

// listKeys answers a page of the keys that match q (in ID or name) and
// tier, sorted by name, tier, created, last_used, usage or spend.
func (h *Handler) listKeys(w http.ResponseWriter, r *http.Request, now time.Time) error {
	q := r.URL.Query()
	recs, err := h.keys.Store().List(r.Context())
	if err != nil {
		return h.unavailable(w, "listing keys", err)
	}
	month := time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	rows, err := h.keys.Ledger().Hours(r.Context(), "", month)
	if err != nil {
		return h.unavailable(w, "reading usage", err)
	}
	today := store.Day(now)
	monthly := make(map[string]*usageTotals)
	daily := make(map[string]*usageTotals)
	for _, row := range rows {
		total(monthly, row.Client).add(row)
		if strings.HasPrefix(row.Day, today) {
			total(daily, row.Client).add(row)
		}
	}
	search, tier := strings.ToLower(q.Get("q")), q.Get("tier")
	recs = slices.DeleteFunc(recs, func(rec store.Record) bool {
		return tier != "" && rec.Tier != tier ||
			search != "" && !strings.Contains(strings.ToLower(rec.ID), search) && !strings.Contains(strings.ToLower(rec.Name), search)
	})
	use := func(id string) usageTotals {
		if t := monthly[id]; t != nil {
			return *t
		}
		return usageTotals{}
	}
	var by func(a, b store.Record) int
	switch q.Get("sort") {
	case "tier":
		by = func(a, b store.Record) int { return strings.Compare(a.Tier, b.Tier) }
	case "created":
		by = func(a, b store.Record) int { return a.Created.Compare(b.Created) }
	case "last_used":
		by = func(a, b store.Record) int { return a.LastUsed.Compare(b.LastUsed) }
	case "usage":
		by = func(a, b store.Record) int { return cmp.Compare(use(a.ID).Tokens, use(b.ID).Tokens) }
	case "spend":
		by = func(a, b store.Record) int { return cmp.Compare(use(a.ID).Cost, use(b.ID).Cost) }
	default:
		by = func(a, b store.Record) int {
			return strings.Compare(strings.ToLower(a.Name), strings.ToLower(b.Name))
		}
	}
	desc := q.Get("desc") == "1"
	slices.SortStableFunc(recs, func(a, b store.Record) int {
		c := cmp.Or(by(a, b), strings.Compare(a.ID, b.ID))
		if desc {
			return -c
		}
		return c
	})
	// Past the last page is the last page: a page number of any size
	// must not overflow the offset into a negative index.
	page, _ := strconv.Atoi(q.Get("page"))
	page = min(max(page, 1), max((len(recs)+pageSize-1)/pageSize, 1))
	rep := keysReport{Total: len(recs), Page: page, PageSize: pageSize, Keys: []keyRow{}, Tiers: []string{}}
	policy := h.source.Policy(h.spec)
	if policy != nil {
		rep.Currency, rep.Tiers = policy.Currency(), policy.Tiers()
	}
	from := min((page-1)*pageSize, len(recs))
	for _, rec := range recs[from:min(from+pageSize, len(recs))] {
		row := keyRow{KeyInfo: keys.NewKeyInfo(rec, now), Month: use(rec.ID)}
		if policy != nil {
			if l, ok := policy.Limits(rec.Tier, h.keys.Settings(rec.ID)); ok {
				row.Limits = &l
				day := usageTotals{}
				if t := daily[rec.ID]; t != nil {
					day = *t
				}
				row.Quota = standingOf(l.Quota, day.Tokens, row.Month.Tokens)
				row.Budget = standingOf(l.Budget, day.Cost, row.Month.Cost)
			}
		}
		rep.Keys = append(rep.Keys, row)
	}
	return writeJSON(w, http.StatusOK, rep)
}

// standingOf is the use of a limit per day or month, or nil without one.
func standingOf(a *policy.Amount, day, month int64) *standing {
	if a == nil {
		return nil
	}
	used := month
	if a.Period == "day" {
		used = day
	}
	return &standing{Period: a.Period, Limit: a.N, Used: used}
}

// keyReport is the answer of api/keys/{id}.
type keyReport struct {
	keys.KeyInfo
	Limits   *Limits       `json:"limits"`
	Currency string        `json:"currency,omitempty"`
	Recent   chart         `json:"recent"` // the last 24 hours by 5 minutes, by model; refusals by reason
	Days     chart         `json:"days"`   // the last 30 days, by model; refusals by reason
	Models   []modelTotals `json:"models"`
	Refusals []reasonTotal `json:"refusals"` // the last 30 days, by reason
}

// key answers one key with its usage by 5 minutes, day and model, and
// its refusals by reason.
func (h *Handler) key(w http.ResponseWriter, r *http.Request, id string, now time.Time) error {
	rec, err := h.keys.Store().Get(r.Context(), id)
	if err != nil {
		return writeError(w, keys.ErrorStatus(err), err.Error())
	}
	rep := keyReport{KeyInfo: keys.NewKeyInfo(rec, now), Recent: newChart(range24h, now), Days: newChart(range30d, now), Models: []modelTotals{}}
	if p := h.source.Policy(h.spec); p != nil {
		rep.Currency = p.Currency()
		if l, ok := p.Limits(rec.Tier, h.keys.Settings(rec.ID)); ok {
			rep.Limits = &l
		}
	}
	ledger := h.keys.Ledger()
	slots, err := ledger.Slots(r.Context(), id, rep.Recent.since())
	if err != nil {
		return h.unavailable(w, "reading usage", err)
	}
	for _, row := range slots {
		rep.Recent.add(row, row.Model)
	}
	days, err := ledger.UsageSince(r.Context(), id, rep.Days.since())
	if err != nil {
		return h.unavailable(w, "reading usage", err)
	}
	recentRefusals, err := ledger.RefusalSlots(r.Context(), id, rep.Recent.since())
	if err != nil {
		return h.unavailable(w, "reading refusals", err)
	}
	refusals, err := ledger.RefusalHours(r.Context(), id, rep.Days.since())
	if err != nil {
		return h.unavailable(w, "reading refusals", err)
	}
	rep.Recent.addRefusals(recentRefusals)
	rep.Refusals = rep.Days.addRefusals(refusals)
	models := make(map[string]*usageTotals)
	for _, row := range days {
		rep.Days.add(row, row.Model)
		total(models, row.Model).add(row)
	}
	for model, t := range models {
		rep.Models = append(rep.Models, modelTotals{Model: model, usageTotals: *t})
	}
	slices.SortFunc(rep.Models, func(a, b modelTotals) int { return cmp.Compare(b.Tokens, a.Tokens) })
	return writeJSON(w, http.StatusOK, rep)
}

// unavailable logs a store failure and answers 503.
func (h *Handler) unavailable(w http.ResponseWriter, what string, err error) error {
	h.logger.Error(what, zap.Error(err))
	return writeError(w, http.StatusServiceUnavailable, what+" failed")
}

// decode reads a JSON body into v, or answers 400 and returns false.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err == nil {
		err = strictjson.Unmarshal(body, v)
	}
	if err != nil {
		_ = writeError(w, http.StatusBadRequest, "decoding the body: "+err.Error())
		return false
	}
	return true
}

// writeJSON writes v with status. Answers may hold a secret: no cache
// may keep them.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n')) // the client has gone; nothing to tell it
	return nil
}

// writeError answers {"error": message} with status.
func writeError(w http.ResponseWriter, status int, message string) error {
	return writeJSON(w, status, map[string]string{"error": message})
}
