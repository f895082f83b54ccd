package wire

import (
	"bytes"
	"math"
	"strconv"
)

// Usage is what an answer's usage object reports.
type Usage struct {
	Prompt     int64 // prompt_tokens
	Completion int64 // completion_tokens
	Cached     int64 // prompt_tokens_details.cached_tokens
	Reasoning  int64 // completion_tokens_details.reasoning_tokens
	Total      int64 // total_tokens
	// Which of prompt_tokens, completion_tokens and total_tokens the
	// object gives (not null): a figure it leaves out is not a zero.
	HasPrompt, HasCompletion, HasTotal bool
	// Garbled is the start of a usage object whose figures are not
	// counts (negative, fractional, not numbers, or beyond any answer's
	// size), kept for the log; empty for a usage object read whole.
	Garbled string
}

// UsageKey starts the usage object of an answer or a stream's event.
var UsageKey = []byte(`"usage":`)

// The counts the reader takes from a usage object, indexes of
// usageFigures.n.
const (
	promptFigure     = iota // prompt_tokens
	completionFigure        // completion_tokens
	cachedFigure            // prompt_tokens_details.cached_tokens
	reasoningFigure         // completion_tokens_details.reasoning_tokens
	totalFigure             // total_tokens
	figureCount
)

// usageFigures is what a usage object says, read as encoding/json would
// decode it into pointers: null clears a figure, a later value replaces an
// earlier one, and a value that is not a number at all (or a details
// field that is not an object) garbles the object whatever follows.
type usageFigures struct {
	n        [figureCount]int64
	seen     [figureCount]bool
	notCount [figureCount]bool // a number, but negative, fractional or too large
	notJSON  bool              // a value encoding/json could not decode
}

func (f *usageFigures) garbled() bool {
	return f.notJSON || f.notCount != [figureCount]bool{}
}

// maxGarbledText bounds the text of a garbled usage object kept for the log.
const maxGarbledText = 256

// ParseUsage reads the last "usage":{…} object in b, without decoding
// the rest: a full decode of every answer would cost more than the proxy
// itself. The object is read as JSON: its fields in any order, the two
// details objects for their cached and reasoning counts, other nested
// values skipped whole, and nothing taken from an object that is cut
// short or malformed. ok reports whether a usage object was read; one
// whose figures are not counts is read as garbled, and keeps its text.
func ParseUsage(b []byte) (u Usage, ok bool) {
	i := bytes.LastIndex(b, UsageKey)
	if i < 0 {
		return u, false
	}
	start := skipSpace(b, i+len(UsageKey))
	if start >= len(b) || b[start] != '{' {
		return u, false // "usage":null
	}
	obj := b[start:skipValue(b, start)]
	if !ValidJSON(obj) {
		return u, false
	}
	var f usageFigures
	for key, v, k, ok := member(obj, 0); ok; key, v, k, ok = member(obj, k) {
		switch string(key) {
		case "prompt_tokens":
			f.read(promptFigure, v)
		case "completion_tokens":
			f.read(completionFigure, v)
		case "total_tokens":
			f.read(totalFigure, v)
		case "prompt_tokens_details":
			f.readDetail(cachedFigure, "cached_tokens", v)
		case "completion_tokens_details":
			f.readDetail(reasoningFigure, "reasoning_tokens", v)
		}
	}
	if !f.seen[promptFigure] && !f.seen[completionFigure] && !f.garbled() {
		return u, false
	}
	u = Usage{
		Prompt: f.n[promptFigure], Completion: f.n[completionFigure], Cached: f.n[cachedFigure], Reasoning: f.n[reasoningFigure], Total: f.n[totalFigure],
		HasPrompt: f.seen[promptFigure], HasCompletion: f.seen[completionFigure], HasTotal: f.seen[totalFigure],
	}
	if f.garbled() {
		u.Garbled = string(obj[:min(len(obj), maxGarbledText)])
	}
	return u, true
}

// member returns the key and value of the member of obj, a valid JSON
// object, that starts at or after k (0: the first), and where to look for
// the next; ok is false past the last.
func member(obj []byte, k int) (key, value []byte, next int, ok bool) {
	if k == 0 {
		k = skipSpace(obj, 1)
	}
	if k >= len(obj) || obj[k] != '"' {
		return nil, nil, k, false
	}
	keyEnd := skipString(obj, k)
	v := skipSpace(obj, skipSpace(obj, keyEnd)+1) // past ':'
	vEnd := skipValue(obj, v)
	if next = skipSpace(obj, vEnd); next < len(obj) && obj[next] == ',' {
		next = skipSpace(obj, next+1)
	}
	return keyName(obj[k:keyEnd]), obj[v:vEnd], next, true
}

// read takes figure i from the JSON value v.
func (f *usageFigures) read(i int, v []byte) {
	f.n[i], f.seen[i], f.notCount[i] = 0, false, false
	if v[0] == 'n' { // null
		return
	}
	switch n, kind := tokenCount(v); kind {
	case aCount:
		f.n[i], f.seen[i] = n, true
	case notACount:
		f.seen[i], f.notCount[i] = true, true
	default:
		f.notJSON = true
	}
}

// readDetail takes figure i from the field name of v, a details object.
func (f *usageFigures) readDetail(i int, name string, v []byte) {
	switch v[0] {
	case 'n':
		f.n[i], f.seen[i], f.notCount[i] = 0, false, false
		return
	case '{':
	default:
		f.notJSON = true
		return
	}
	for key, dv, k, ok := member(v, 0); ok; key, dv, k, ok = member(v, k) {
		if string(key) == name {
			f.read(i, dv)
		}
	}
}

// maxReportedTokens bounds a count the upstream reports for one answer;
// past it the count is garbled. The proxy's own bound per request is far
// lower (see charge), but this one keeps every sum of reported counts
// exact and far from overflowing.
const maxReportedTokens = 1 << 40

// What a reported figure is.
const (
	aCount    = iota
	notACount // a number, but negative, fractional or too large
	notANumber
)

// tokenCount reads a JSON value that counts tokens: digits, or a number
// with a fraction or exponent whose value is a whole count (1e6).
func tokenCount(v []byte) (n int64, kind int) {
	if n, end, ok := leadingDigits(v, maxReportedTokens); ok && end == len(v) {
		return n, aCount
	}
	f, err := strconv.ParseFloat(string(v), 64)
	switch {
	case err != nil: // a string, an object, or beyond float64 (1e400)
		return 0, notANumber
	case f < 0 || f > maxReportedTokens || f != math.Trunc(f):
		return 0, notACount
	}
	return int64(f), aCount
}
