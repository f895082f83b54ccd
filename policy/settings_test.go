package policy

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseMoney(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		err  bool
	}{
		{in: "50", want: 50_000_000},
		{in: "0.10", want: 100_000},
		{in: "0.1", want: 100_000},
		{in: "12.345678", want: 12_345_678},
		{in: "0.000001", want: 1},
		{in: "0", want: 0},
		{in: "000.5", want: 500_000},
		{in: "1000000", want: MaxMoney},
		{in: "1000000.000001", err: true},
		{in: "99999999999999", err: true},
		{in: "1.2345678", err: true},
		{in: "", err: true},
		{in: ".5", err: true},
		{in: "5.", err: true},
		{in: "-1", err: true},
		{in: "+1", err: true},
		{in: "1e3", err: true},
		{in: "1,5", err: true},
		{in: " 1", err: true},
		{in: "1.2.3", err: true},
		{in: "NaN", err: true},
	}
	for _, tt := range tests {
		got, err := ParseMoney(tt.in, MaxMoney)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("ParseMoney(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.err)
		}
		if err == nil {
			if back, err := ParseMoney(FormatMoney(got), MaxMoney); err != nil || back != got {
				t.Errorf("ParseMoney(FormatMoney(%d) = %q) = %d, %v", got, FormatMoney(got), back, err)
			}
		}
	}
	for micros, want := range map[int64]string{50_000_000: "50", 100_000: "0.1", 12_345_678: "12.345678", 1: "0.000001", 0: "0", -1_500_000: "-1.5"} {
		if got := FormatMoney(micros); got != want {
			t.Errorf("FormatMoney(%d) = %q, want %q", micros, got, want)
		}
	}
}

func TestParseRateQuotaBudget(t *testing.T) {
	r, err := ParseRate("60/1m burst 10")
	if want := (Rate{N: 60, Window: time.Minute, Burst: 10}); err != nil || r != want {
		t.Errorf("ParseRate = %+v, %v; want %+v", r, err, want)
	}
	if r.String() != "60/1m burst 10" {
		t.Errorf("String = %q", r.String())
	}
	if r, err := ParseRate("2/1h"); err != nil || r.String() != "2/1h" {
		t.Errorf("ParseRate(2/1h) = %v (%v)", r, err)
	}
	for _, bad := range []string{"", "60", "0/1m", "-1/1m", "60/0s", "60/1m burst", "60/1m burst 0", "60/1m bust 5", "x/1m"} {
		if _, err := ParseRate(bad); err == nil {
			t.Errorf("ParseRate(%q) = %v, want an error", bad, err)
		}
	}
	if a, err := ParseQuota("10000000/month"); err != nil || a != (Amount{N: 10_000_000, Period: "month"}) {
		t.Errorf("ParseQuota = %+v, %v", a, err)
	}
	if a, err := ParseBudget("0.25/day"); err != nil || a != (Amount{N: 250_000, Period: "day"}) {
		t.Errorf("ParseBudget = %+v, %v", a, err)
	}
	for _, bad := range []string{"50", "50/week", "0/day", "1.5/month", "/month"} {
		if _, err := ParseQuota(bad); err == nil {
			t.Errorf("ParseQuota(%q) = %v, want an error", bad, err)
		}
	}
	for _, bad := range []string{"50", "-5/day", "0/month", "1.1234567/day"} {
		if _, err := ParseBudget(bad); err == nil {
			t.Errorf("ParseBudget(%q) = %v, want an error", bad, err)
		}
	}
}

// fullSettings sets every field.
func fullSettings() Settings {
	conc, maxTok := 5, int64(2048)
	return Settings{
		Requests:   &Rate{N: 100, Window: time.Minute},
		Tokens:     &Rate{N: 200_000, Window: time.Minute, Burst: 50_000},
		Concurrent: &conc,
		Quota:      &Amount{N: 10_000_000, Period: "month"},
		Budget:     &Amount{N: 50_000_000, Period: "month"},
		Models:     []string{"vigthoria-fast-*"},
		MaxTokens:  &maxTok,
		Origins:    []string{"https://app.acme.com", "http://localhost:3000"},
	}
}

func TestSettingsCheckAndJSON(t *testing.T) {
	full := fullSettings()
	if err := full.Check(); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(full)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"requests":{"n":100,"window":"1m"}`) {
		t.Errorf("JSON = %s, want the window as a duration string", b)
	}
	var back Settings
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, full) {
		t.Errorf("JSON round trip = %+v, %v; want %+v", back, err, full)
	}
	if (&Settings{}).IsZero() != true || full.IsZero() {
		t.Error("IsZero is wrong")
	}
	zero, neg := 0, int64(-1)
	bad := map[string]Settings{
		"zero rate":          {Requests: &Rate{N: 0, Window: time.Minute}},
		"no window":          {Tokens: &Rate{N: 1}},
		"negative burst":     {Tokens: &Rate{N: 1, Window: time.Second, Burst: -1}},
		"zero concurrent":    {Concurrent: &zero},
		"negative max":       {MaxTokens: &neg},
		"quota period":       {Quota: &Amount{N: 1, Period: "week"}},
		"zero budget":        {Budget: &Amount{N: 0, Period: "day"}},
		"huge budget":        {Budget: &Amount{N: MaxMoney + 1, Period: "day"}},
		"empty models":       {Models: []string{}},
		"bad glob":           {Models: []string{"a["}},
		"control in model":   {Models: []string{"a\nb"}},
		"empty origins":      {Origins: []string{}},
		"origin with a path": {Origins: []string{"https://a.example/x"}},
		"origin no scheme":   {Origins: []string{"a.example"}},
		"origin trailing /":  {Origins: []string{"https://a.example/"}},
		"ftp origin":         {Origins: []string{"ftp://a.example"}},
	}
	for name, s := range bad {
		if err := s.Check(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: Check = %v, want ErrInvalid", name, err)
		}
	}
	var nilSettings *Settings
	for _, tt := range []struct {
		s      *Settings
		origin string
		want   bool
	}{
		{nilSettings, "https://evil.example", true},
		{&Settings{}, "https://evil.example", true},
		{&full, "", true},
		{&full, "https://app.acme.com", true},
		{&full, "https://evil.example", false},
		{&full, "https://app.acme.com:443", false},
	} {
		if got := tt.s.AllowsOrigin(tt.origin); got != tt.want {
			t.Errorf("AllowsOrigin(%q) with %v = %v, want %v", tt.origin, tt.s, got, tt.want)
		}
	}
}
