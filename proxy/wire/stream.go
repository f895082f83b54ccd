package wire

import "bytes"

// StreamedTokens guesses the output tokens of one event: a token for each
// choice whose delta carries output of any kind, and one more for every
// bytesPerToken bytes past the first 16 of a long one.
//
// Upstreams send a chunk a token, or nearly (content, reasoning, tool call
// arguments alike), so a chunk is a token; the allowance for long deltas
// keeps an upstream that sends output in large pieces from being counted
// short. Every string of a delta is output except its role, IDs and
// types; audio data counts its chunk, not its bytes, which encode sound,
// not tokens.
//
// It reads the event in one pass, without decoding it, and is safe on any
// bytes: an event that is not JSON counts what it seems to carry.
func StreamedTokens(ev []byte) int64 {
	i := bytes.Index(ev, choicesKey)
	if i < 0 {
		return 0
	}
	i = skipSpace(ev, i+len(choicesKey))
	if i == len(ev) || ev[i] != '[' {
		return 0
	}
	var (
		tokens int64
		out    output
		depth  int    // 1 in the choices array, 2 in a choice
		in     int    // the depth of a delta's fields while in it, else 0
		key    []byte // the last key read
	)
	for ; i < len(ev); i++ {
		switch c := ev[i]; c {
		case '[', '{':
			depth++
		case ']', '}':
			depth--
			if depth == 1 && c == '}' { // a choice ended
				tokens += out.tokens()
				out = output{}
			}
			if depth <= 0 {
				return tokens
			}
		case '"':
			end := skipString(ev, i)
			if j := skipSpace(ev, end); j < len(ev) && ev[j] == ':' {
				key = ev[i:end]
				if depth == 2 {
					in = 0
					if string(key) == `"delta"` {
						in = 3
					}
				}
				i = j
				continue
			}
			if (in > 0 && depth >= in) || (depth == 2 && string(key) == `"text"`) {
				out.add(key, ev[i:end])
			}
			i = end - 1
		}
	}
	return tokens + out.tokens()
}

var choicesKey = []byte(`"choices":`)

// output sums the output of one choice's delta.
type output struct {
	bytes int64 // of the output's strings, as they are written
	any   bool  // some output, if only audio
}

// add counts the string value s (quotes included) of key: every string but
// roles, IDs and types is output.
func (o *output) add(key, s []byte) {
	if len(s) <= 2 {
		return
	}
	switch string(key) {
	case `"role"`, `"id"`, `"type"`:
	case `"data"`: // audio, base64
		o.any = true
	default:
		o.bytes += int64(len(s) - 2)
		o.any = true
	}
}

func (o *output) tokens() int64 {
	if !o.any {
		return 0
	}
	return 1 + max(0, o.bytes-16)/bytesPerToken
}
