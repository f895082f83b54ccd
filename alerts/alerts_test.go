package alerts

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/vigthoria/caddy-vigthoria/internal/hooktest"
	"github.com/vigthoria/caddy-vigthoria/internal/testcheck"
)

// Every test closes its Senders and Notifiers: none of their goroutines
// may outlive it.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestSignSpecVector checks Sign against the example of the Standard
// Webhooks libraries' tests.
func TestSignSpecVector(t *testing.T) {
	s, err := ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		t.Fatal(err)
	}
	got := s.Sign("msg_p5jXN8AQM9LWM0D4loKWxJek", time.Unix(1614265330, 0), []byte(`{"test": 2432232314}`))
	if want := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="; got != want {
		t.Errorf("Sign = %s, want %s", got, want)
	}
	if fmt.Sprint(s) != "whsec_(hidden)" || fmt.Sprintf("%#v", s) != "whsec_(hidden)" {
		t.Errorf("a printed secret shows %v / %#v", s, s)
	}
}

func TestParseSecretRefuses(t *testing.T) {
	for name, s := range map[string]string{
		"empty":       "",
		"no prefix":   "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
		"not base64":  "whsec_not base64!",
		"too short":   "whsec_c2hvcnQ=",
		"url base64":  "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2La-_Sw",
		"placeholder": "{env.VIGTHORIA_WEBHOOK_SECRET}",
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := ParseSecret(s); err != ErrSecret {
				t.Errorf("ParseSecret(%q) = %v, want ErrSecret", s, err)
			}
		})
	}
}

func TestCrossed(t *testing.T) {
	for _, c := range []struct {
		used, limit int64
		pct         int
		want        bool
	}{
		{799, 1000, 80, false},
		{800, 1000, 80, true},
		{999, 1000, 100, false},
		{1000, 1000, 100, true},
		{1, 3, 34, false}, // 34% of 3 is 1.02: 2 crosses it
		{2, 3, 34, true},
		{1<<62 + 1<<61, 1 << 62, 100, true},
		{1<<62 - 1, 1 << 62, 100, false},
		{9_223_372_036_854_775_807, 9_223_372_036_854_775_807, 100, true},
		{9_223_372_036_854_775_806, 9_223_372_036_854_775_807, 100, false},
	} {
		if got := crossed(c.used, c.limit, c.pct); got != c.want {
			t.Errorf("crossed(%d, %d, %d%%) = %v, want %v", c.used, c.limit, c.pct, got, c.want)
		}
	}
}

func TestAlertBody(t *testing.T) {
	a := Alert{Type: Quota, KeyID: "key_1", KeyName: "acme", Tier: "pro", Period: "2026-12-01",
		Used: 800, Limit: 1000, Percent: 80, At: time.Date(2026, 12, 1, 10, 4, 5, 6789, time.FixedZone("x", 3600))}
	b, err := a.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"type":"quota","key_id":"key_1","key_name":"acme","tier":"pro","period":"2026-12-01","used":800,"limit":1000,"percent":80,"at":"2026-12-01T09:04:05Z"}`
	if string(b) != want {
		t.Errorf("body\n got %s\nwant %s", b, want)
	}
	if a.ClaimID() != "quota|key_1|80|2026-12-01" {
		t.Errorf("ClaimID = %s", a.ClaimID())
	}
	other := a
	other.Percent = 100
	if a.WebhookID() == other.WebhookID() || a.WebhookID() != (Alert{Type: Quota, KeyID: "key_1", Percent: 80, Period: "2026-12-01"}).WebhookID() {
		t.Error("WebhookID must follow the claim ID and only it")
	}
}

// TestRefusalBody: a refusal says what the refused request asked, and
// names no threshold.
func TestRefusalBody(t *testing.T) {
	a := Alert{Type: BudgetRefused, KeyID: "key_1", KeyName: "acme", Tier: "pro", Period: "2026-12",
		Used: 0, Limit: 1000, Requested: 81960, At: time.Date(2026, 12, 1, 10, 4, 5, 0, time.UTC)}
	b, err := a.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"type":"budget_refused","key_id":"key_1","key_name":"acme","tier":"pro","period":"2026-12","used":0,"limit":1000,"requested":81960,"at":"2026-12-01T10:04:05Z"}`
	if string(b) != want {
		t.Errorf("body\n got %s\nwant %s", b, want)
	}
	if d := a.EventData(); d["requested"] != int64(81960) || d["percent"] != nil {
		t.Errorf("event data %v, want requested and no percent", d)
	}
}

func TestPeriods(t *testing.T) {
	at := time.Date(2026, 12, 31, 23, 59, 0, 0, time.UTC)
	for unit, want := range map[string]string{"day": "2026-12-31", "month": "2026-12"} {
		p, err := PeriodName(at, unit)
		if err != nil || p != want {
			t.Errorf("PeriodName(%s) = %q, %v; want %q", unit, p, err, want)
		}
		end, err := periodEnd(p)
		if err != nil || !end.Equal(time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC)) {
			t.Errorf("periodEnd(%s) = %v, %v; want 2027-01-01", p, end, err)
		}
	}
	if allocs := testing.AllocsPerRun(100, func() { PeriodName(at, "day") }); allocs != 0 {
		t.Errorf("PeriodName allocates %v times in the period it named last, want 0", allocs)
	}
	if _, err := PeriodName(at, "week"); err == nil {
		t.Error("PeriodName accepted a week")
	}
	if _, err := periodEnd("2026"); err == nil {
		t.Error("periodEnd accepted a year")
	}
}

// fastBackoff retries within milliseconds.
var fastBackoff = Backoff{First: 5 * time.Millisecond, Max: 20 * time.Millisecond, GiveUp: 2 * time.Second}

func newSender(t *testing.T, url string, queue int, b Backoff) *Sender {
	t.Helper()
	secret, err := ParseSecret(hooktest.Secret)
	if err != nil {
		t.Fatal(err)
	}
	s := NewSender(SenderConfig{URL: url, Secret: secret, Queue: queue, Backoff: b})
	t.Cleanup(s.Close)
	return s
}

func testAlert(key string, pct int) Alert {
	return Alert{Type: Budget, KeyID: key, KeyName: "n", Tier: "pro", Period: "2026-12", Used: 50, Limit: 50, Percent: pct, At: time.Now()}
}

// TestSenderRetriesUntilAccepted: a receiver that answers 500 twice to
// every alert gets each exactly once, on the third attempt, under the
// same webhook-id, every attempt signed.
func TestSenderRetriesUntilAccepted(t *testing.T) {
	r := hooktest.New(t, hooktest.Secret)
	r.FailFirst = 2
	s := newSender(t, r.URL, 100, fastBackoff)
	before := testutil.ToFloat64(delivered)
	const n = 20
	for i := range n {
		if !s.Enqueue(testAlert(fmt.Sprint("key_", i), 80)) {
			t.Fatal("Enqueue dropped an alert with room in the queue")
		}
	}
	if got := len(r.WaitAccepted(n, 5*time.Second)); got != n {
		t.Fatalf("accepted %d alerts, want %d", got, n)
	}
	for id, k := range r.Accepted() {
		if k != 1 || r.Attempts()[id] != 3 {
			t.Errorf("webhook-id %s: accepted %d times in %d attempts, want once in 3", id, k, r.Attempts()[id])
		}
	}
	// Counted once the sender has read the receiver's answer, which may
	// be after the receiver noted it.
	testcheck.WaitFor(t, 5*time.Second, "the deliveries counted", func() bool { return testutil.ToFloat64(delivered)-before >= n })
	if got := testutil.ToFloat64(delivered) - before; got != n {
		t.Errorf("delivered_total rose by %v, want %d", got, n)
	}
}

// TestSenderFollowsNoRedirect: a receiver that redirects has not taken
// the alert, and the signed alert goes nowhere else.
func TestSenderFollowsNoRedirect(t *testing.T) {
	var elsewhere atomic.Int64
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { elsewhere.Add(1) }))
	t.Cleanup(other.Close)
	srv := httptest.NewServer(http.RedirectHandler(other.URL, http.StatusTemporaryRedirect))
	t.Cleanup(srv.Close)
	before := testutil.ToFloat64(failedStatus)
	s := newSender(t, srv.URL, 10, fastBackoff)
	s.Enqueue(testAlert("key_r", 100))
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(failedStatus) < before+2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := testutil.ToFloat64(failedStatus) - before; got < 2 {
		t.Errorf("%v failed attempts counted, want the redirects counted as failures and retried", got)
	}
	if n := elsewhere.Load(); n != 0 {
		t.Errorf("the redirect's target got %d alerts, want none", n)
	}
}

// TestSenderGivesUp: a receiver that always fails is tried until GiveUp
// after the first attempt, then the alert is abandoned and counted.
//
// Each bound below holds however late the machine runs the sender, so
// that a busy machine cannot fail it: the sender logs when it plans each
// attempt (next), an attempt starts at or after its plan and before the
// receiver sees it, and the plan is the attempt before's start plus a
// wait of half the backoff to the whole of it.
func TestSenderGivesUp(t *testing.T) {
	var mu sync.Mutex
	var arrivals []time.Time
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		arrivals = append(arrivals, time.Now())
		mu.Unlock()
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	t.Cleanup(srv.Close)
	secret, err := ParseSecret(hooktest.Secret)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.WarnLevel)
	b := Backoff{First: 10 * time.Millisecond, Max: 40 * time.Millisecond, GiveUp: 300 * time.Millisecond}
	s := NewSender(SenderConfig{URL: srv.URL, Secret: secret, Queue: 10, Backoff: b, Logger: zap.New(core)})
	t.Cleanup(s.Close)
	before := testutil.ToFloat64(failedGaveUp)
	enqueued := time.Now()
	s.Enqueue(testAlert("key_x", 100))
	deadline := time.Now().Add(10 * time.Second)
	for testutil.ToFloat64(failedGaveUp) == before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if testutil.ToFloat64(failedGaveUp) != before+1 {
		t.Fatal("the alert was not given up")
	}
	s.Close() // no attempt after giving up: the receiver's count is final
	var planned []time.Time
	for _, e := range logs.FilterMessage("alert webhook failed; retrying").All() {
		planned = append(planned, e.ContextMap()["next"].(time.Time))
	}
	gaveUp := logs.FilterMessage("alert webhook not delivered: giving up").All()
	mu.Lock()
	defer mu.Unlock()
	if len(gaveUp) != 1 || gaveUp[0].ContextMap()["attempts"] != int64(len(arrivals)) {
		t.Fatalf("%d attempts received, %d retries planned, give-up logged as %v", len(arrivals), len(planned), gaveUp)
	}
	if len(planned) != len(arrivals)-1 {
		t.Fatalf("%d attempts received, %d retries planned, want one fewer", len(arrivals), len(planned))
	}
	for i, next := range planned {
		wait := min(b.First<<i, b.Max) // the backoff after attempt i+1
		if arrivals[i+1].Before(next) {
			t.Errorf("attempt %d came %s before its plan", i+2, next.Sub(arrivals[i+1]))
		}
		if next.After(arrivals[i].Add(wait)) {
			t.Errorf("attempt %d planned %s after attempt %d, want at most the backoff %s", i+2, next.Sub(arrivals[i]), i+1, wait)
		}
		since, from := enqueued, "the alert came" // attempt 1 started after it
		if i > 0 {
			since, from = planned[i-1], fmt.Sprintf("attempt %d's plan", i+1)
		}
		if next.Sub(since) < wait/2 {
			t.Errorf("attempt %d planned %s after %s, want at least half the backoff %s", i+2, next.Sub(since), from, wait)
		}
		if next.Sub(arrivals[0]) > b.GiveUp {
			t.Errorf("attempt %d planned %s after the first, past GiveUp", i+2, next.Sub(arrivals[0]))
		}
	}
	// It gives up only when the next wait would pass GiveUp: the last
	// attempt started later than GiveUp less the longest wait.
	if last := arrivals[len(arrivals)-1]; last.Sub(enqueued) <= b.GiveUp-b.Max {
		t.Errorf("gave up after an attempt %s after the alert came, want past %s", last.Sub(enqueued), b.GiveUp-b.Max)
	}
}

// TestEnqueueFullQueueDrops: while the worker is stuck on a receiver
// that does not answer, a full queue drops at once and counts the drop.
func TestEnqueueFullQueueDrops(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) })
	s := newSender(t, srv.URL, 4, fastBackoff)
	before := testutil.ToFloat64(dropped)
	begin := time.Now()
	taken := 0
	for i := range 1000 {
		if s.Enqueue(testAlert(fmt.Sprint("key_", i), 80)) {
			taken++
		}
	}
	if d := time.Since(begin); d > 100*time.Millisecond {
		t.Errorf("1000 Enqueues took %s", d)
	}
	// The worker holds one alert, the queue four more.
	if taken < 4 || taken > 5 {
		t.Errorf("%d alerts taken, want 4 or 5", taken)
	}
	if got := testutil.ToFloat64(dropped) - before; got != float64(1000-taken) {
		t.Errorf("dropped_total rose by %v, want %d", got, 1000-taken)
	}
}

// mapClaimer is a Claimer in memory: one process's fleet.
type mapClaimer struct {
	mu     sync.Mutex
	claims map[string]time.Time
	calls  int
	fail   error
}

func (c *mapClaimer) Claim(_ context.Context, id string, until time.Time) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	if c.fail != nil {
		return false, c.fail
	}
	if c.claims == nil {
		c.claims = make(map[string]time.Time)
	}
	if _, ok := c.claims[id]; ok {
		return false, nil
	}
	c.claims[id] = until
	return true, nil
}

func (c *mapClaimer) callCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls
}

// eventLog records emitted events.
type eventLog struct {
	mu     sync.Mutex
	events []string
}

func (l *eventLog) emit(name string, data map[string]any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, fmt.Sprintf("%s %s %v%%", name, data["key_id"], data["percent"]))
}

func (l *eventLog) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.events...)
}

func newNotifier(t *testing.T, c Claimer, emit Emitter, s *Sender) *Notifier {
	t.Helper()
	n, err := NewNotifier(Config{Thresholds: []int{100, 80, 80}, Claimer: c, Emit: emit, Webhook: s})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	return n
}

// TestNotifierThresholds: each threshold alerts once per key and
// period, both at once when one figure crosses both, and again in the
// next period; the events and the webhooks agree.
func TestNotifierThresholds(t *testing.T) {
	r := hooktest.New(t, hooktest.Secret)
	var events eventLog
	c := new(mapClaimer)
	n := newNotifier(t, c, events.emit, newSender(t, r.URL, 100, fastBackoff))
	fig := Figure{Type: Quota, KeyID: "key_a", KeyName: "a", Tier: "pro", Period: "2026-12-01", Limit: 1000}
	for _, used := range []int64{100, 799, 800, 850, 900, 999} {
		fig.Used = used
		n.Note(fig)
	}
	other := fig
	other.KeyID, other.Used = "key_b", 1200 // both at once
	n.Note(other)
	fig.Used = 1000
	n.Note(fig)
	n.Note(fig)
	next := fig
	next.Period = "2026-12-02"
	n.Note(next)

	bodies := r.WaitAccepted(5, 5*time.Second)
	time.Sleep(50 * time.Millisecond) // anything more would arrive now
	got := map[string]int{}
	for _, b := range r.Bodies() {
		got[fmt.Sprintf("%s %s %d%%", b.KeyID, b.Period, b.Percent)]++
		if b.Type != Quota || b.Limit != 1000 || b.Tier != "pro" {
			t.Errorf("body %+v", b)
		}
	}
	want := map[string]int{
		"key_a 2026-12-01 80%": 1, "key_a 2026-12-01 100%": 1,
		"key_b 2026-12-01 80%": 1, "key_b 2026-12-01 100%": 1,
		"key_a 2026-12-02 80%": 1, "key_a 2026-12-02 100%": 1,
	}
	if len(bodies) < 5 || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("alerts delivered: %v\nwant %v", got, want)
	}
	if len(events.all()) != 6 {
		t.Errorf("events %v, want 6", events.all())
	}
	if c.callCount() != 6 {
		t.Errorf("%d claims, want 6: repeats must be answered from memory", c.callCount())
	}
	for _, b := range r.Bodies() {
		if b.KeyID == "key_a" && b.Percent == 80 && b.Period == "2026-12-01" && b.Used != 800 {
			t.Errorf("the 80%% alert says used %d, want 800, the figure that crossed it", b.Used)
		}
	}
}

// TestNotifierRefusals: a refusal alerts once per key, kind and period,
// whatever its figures, and crosses no threshold.
func TestNotifierRefusals(t *testing.T) {
	r := hooktest.New(t, hooktest.Secret)
	var events eventLog
	n := newNotifier(t, new(mapClaimer), events.emit, newSender(t, r.URL, 100, fastBackoff))
	fig := Figure{Type: BudgetRefused, KeyID: "key_a", Tier: "pro", Period: "2026-12", Used: 0, Limit: 1000, Requested: 5000}
	n.Note(fig)
	n.Note(fig)
	quota := fig
	quota.Type = QuotaRefused
	n.Note(quota)
	r.WaitAccepted(2, 5*time.Second)
	time.Sleep(50 * time.Millisecond) // anything more would arrive now
	got := map[string]int{}
	for _, b := range r.Bodies() {
		got[b.Type]++
		if b.Percent != 0 || b.Requested == nil || *b.Requested != 5000 || b.Used != 0 {
			t.Errorf("body %+v, want the refusal's figures and no threshold", b)
		}
	}
	if got[BudgetRefused] != 1 || got[QuotaRefused] != 1 || len(got) != 2 {
		t.Errorf("alerts delivered: %v, want one budget_refused and one quota_refused", got)
	}
	for _, e := range events.all() {
		if !strings.HasPrefix(e, "vigthoria.budget_refused key_a") && !strings.HasPrefix(e, "vigthoria.quota_refused key_a") {
			t.Errorf("event %s, want a refusal's", e)
		}
	}
}

// TestNotifierKeyState: a server key taken out and returned alerts once
// each per minute, for the fleet (two notifiers sharing one claim
// store), by the webhook alone: its Caddy event is the pool's, per
// instance. The body names the key and its state, nothing of figures.
func TestNotifierKeyState(t *testing.T) {
	r := hooktest.New(t, hooktest.Secret)
	var events eventLog
	c := new(mapClaimer)
	s := newSender(t, r.URL, 100, fastBackoff)
	a, b := newNotifier(t, c, events.emit, s), newNotifier(t, c, events.emit, s)
	at := time.Date(2026, 12, 7, 6, 40, 12, 0, time.UTC)
	a.KeyState("main", false, 401, at)
	b.KeyState("main", false, 401, at.Add(time.Second)) // the other instance, the same minute
	a.KeyState("main", false, 401, at.Add(2*time.Second))
	a.KeyState("main", true, 200, at.Add(3*time.Second))
	r.WaitAccepted(2, 5*time.Second)
	time.Sleep(50 * time.Millisecond) // anything more would arrive now
	got := map[string]int{}
	for _, body := range r.Bodies() {
		got[fmt.Sprintf("%s %s %s %d", body.Type, body.Key, body.State, body.Status)]++
		if body.KeyID != "" || body.Tier != "" || body.Limit != 0 || body.At == "" {
			t.Errorf("body %+v, want a key's state and no figures", body)
		}
	}
	want := map[string]int{"upstream_key main disabled 401": 1, "upstream_key main enabled 200": 1}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("alerts delivered: %v\nwant %v", got, want)
	}
	if e := events.all(); len(e) != 0 {
		t.Errorf("the notifier emitted %v; the pool emits a key's events", e)
	}
}

// TestNotifierClaimLost: an alert another instance claimed is neither
// emitted nor sent, and not claimed again.
func TestNotifierClaimLost(t *testing.T) {
	c := new(mapClaimer)
	c.Claim(t.Context(), "budget|key_a|100|2026-12", time.Now().Add(time.Hour))
	var events eventLog
	n := newNotifier(t, c, events.emit, nil)
	for range 3 {
		n.Note(Figure{Type: Budget, KeyID: "key_a", Period: "2026-12", Used: 60, Limit: 50})
	}
	waitFor(t, func() bool { return len(events.all()) == 1 })
	time.Sleep(20 * time.Millisecond)
	if got := events.all(); len(got) != 1 || got[0] != "vigthoria.budget key_a 80%" {
		t.Errorf("events %v, want the 80%% one only", got)
	}
	if c.callCount() != 3 {
		t.Errorf("%d claims, want 3 (the test's and one per threshold)", c.callCount())
	}
}

// TestNotifierClaimErrorRetries: a failed claim is forgotten, so that
// the next figure past the threshold claims it again.
func TestNotifierClaimErrorRetries(t *testing.T) {
	c := &mapClaimer{fail: fmt.Errorf("store down")}
	var events eventLog
	n := newNotifier(t, c, events.emit, nil)
	fig := Figure{Type: Quota, KeyID: "key_a", Period: "2026-12", Used: 80, Limit: 100}
	n.Note(fig)
	waitFor(t, func() bool { return c.callCount() == 1 })
	waitFor(t, func() bool { n.Note(fig); return c.callCount() >= 2 })
	c.mu.Lock()
	c.fail = nil
	c.mu.Unlock()
	waitFor(t, func() bool { n.Note(fig); return len(events.all()) == 1 })
}

// TestNoteAllocatesNothing: below every threshold, and past thresholds
// already noted, Note costs no allocation.
func TestNoteAllocatesNothing(t *testing.T) {
	n := newNotifier(t, new(mapClaimer), nil, nil)
	below := Figure{Type: Quota, KeyID: "key_a", Period: "2026-12", Used: 10, Limit: 100}
	past := below
	past.Used = 100
	n.Note(past)
	for name, f := range map[string]Figure{"below": below, "past, noted": past} {
		if allocs := testing.AllocsPerRun(100, func() { n.Note(f) }); allocs != 0 {
			t.Errorf("%s: Note allocates %v times, want 0", name, allocs)
		}
	}
}

func TestNotifierConfig(t *testing.T) {
	if _, err := NewNotifier(Config{Thresholds: []int{80}}); err == nil {
		t.Error("a Notifier without a Claimer was made")
	}
	for _, bad := range []int{0, 101, -5} {
		if _, err := NewNotifier(Config{Thresholds: []int{bad}, Claimer: new(mapClaimer)}); err == nil {
			t.Errorf("threshold %d%% accepted", bad)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
