package strictjson

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

type inner struct {
	N      int64  `json:"n"`
	Period string `json:"period"`
}

type withRaw struct{ X int }

func (w *withRaw) UnmarshalJSON(b []byte) error {
	var raw struct {
		X int `json:"x"`
	}
	if err := Unmarshal(b, &raw); err != nil {
		return err
	}
	w.X = raw.X
	return nil
}

type outer struct {
	Name   string            `json:"name"`
	Budget *inner            `json:"budget,omitempty"`
	List   []inner           `json:"list"`
	ByName map[string]inner  `json:"by_name"`
	Raw    json.RawMessage   `json:"raw"`
	Own    *withRaw          `json:"own"`
	Any    any               `json:"any"`
	Skip   string            `json:"-"`
	Plain  int               // no tag: its Go name
	When   time.Duration     `json:"when"`
	Extra  map[string]string `json:"extra"`
}

func TestUnmarshal(t *testing.T) {
	for _, tt := range []struct {
		name, in string
		err      string // "" for none
	}{
		{"valid", `{"name":"a","budget":{"n":5,"period":"day"},"list":[{"n":1}],"by_name":{"A":{"n":2}},"raw":{"Any":1},"own":{"x":1},"any":{"Whatever":1},"Plain":3,"extra":{"K":"v"}}`, ""},
		{"null nested", `{"budget":null,"own":null}`, ""},
		{"case-folded top", `{"Name":"a"}`, `unknown field Name: names are case-sensitive, write "name"`},
		{"case-folded nested", `{"budget":{"N":5}}`, `unknown field budget.N`},
		{"unknown nested", `{"budget":{"n":5,"every":1}}`, `unknown field budget.every`},
		{"in a list", `{"list":[{"n":1},{"Period":"day"}]}`, `unknown field list[1].Period`},
		{"in a map", `{"by_name":{"a":{"x":1}}}`, `unknown field by_name.a.x`},
		{"own rules", `{"own":{"X":1}}`, `unknown field X`},
		{"skipped field", `{"Skip":"x"}`, `unknown field Skip`},
		{"Go name only exact", `{"plain":1}`, `write "Plain"`},
		{"twice", `{"name":"a","name":"b"}`, `field name is given twice`},
		{"twice nested", `{"budget":{"n":1,"n":2}}`, `field budget.n is given twice`},
		{"trailing value", `{"name":"a"} {}`, `more than one JSON value`},
		{"overflow", `{"budget":{"n":9223372036854775808}}`, `field budget.n: want a JSON integer`},
		{"wrong type", `{"name":5}`, `field name: want a JSON string`},
		{"not JSON", `{"name":`, `reading JSON`},
		{"too deep", `{"any":` + strings.Repeat("[", 40) + strings.Repeat("]", 40) + `}`, `nested more than`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var v outer
			err := Unmarshal([]byte(tt.in), &v)
			switch {
			case tt.err == "" && err != nil:
				t.Fatalf("Unmarshal(%s) = %v, want no error", tt.in, err)
			case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
				t.Fatalf("Unmarshal(%s) = %v, want an error with %q", tt.in, err, tt.err)
			}
		})
	}
	var v outer
	if err := Unmarshal([]byte(`{"name":"a","budget":{"n":5,"period":"day"},"own":{"x":7}}`), &v); err != nil ||
		v.Name != "a" || v.Budget.N != 5 || v.Own.X != 7 {
		t.Errorf("decoded %+v, %v", v, err)
	}
}
