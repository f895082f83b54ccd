package wire

// maxJSONDepth is encoding/json's nesting limit, which ValidJSON keeps.
const maxJSONDepth = 10000

// ValidJSON reports what json.Valid reports, in one pass over b without
// the per-byte function calls of encoding/json's scanner: it runs on
// every request and every answer. FuzzValidJSON holds it to json.Valid.
func ValidJSON(b []byte) bool {
	var open [64]byte // '{' or '[' of each level; deeper levels grow it
	stack := open[:0]
	i := skipSpace(b, 0)
	for {
		// A value starts at i.
		if i >= len(b) {
			return false
		}
		ok := true
		switch c := b[i]; {
		case c == '{' || c == '[':
			if len(stack) == maxJSONDepth {
				return false // an empty one counts too, as in encoding/json
			}
			close := byte('}')
			if c == '[' {
				close = ']'
			}
			i = skipSpace(b, i+1)
			if i < len(b) && b[i] == close {
				i++
				break
			}
			stack = append(stack, c)
			if c == '{' {
				if i, ok = objectKey(b, i); !ok {
					return false
				}
			}
			continue
		case c == '"':
			i, ok = stringEnd(b, i)
		case c == '-' || '0' <= c && c <= '9':
			i, ok = numberEnd(b, i)
		case c == 't':
			i, ok = literalEnd(b, i, "true")
		case c == 'f':
			i, ok = literalEnd(b, i, "false")
		case c == 'n':
			i, ok = literalEnd(b, i, "null")
		default:
			return false
		}
		if !ok {
			return false
		}
		// After a value: close levels, or go on to the next member.
		for {
			i = skipSpace(b, i)
			if len(stack) == 0 {
				return i == len(b)
			}
			if i >= len(b) {
				return false
			}
			top := stack[len(stack)-1]
			if b[i] == ',' {
				i = skipSpace(b, i+1)
				if top == '{' {
					if i, ok = objectKey(b, i); !ok {
						return false
					}
				}
				break
			}
			if top == '{' && b[i] != '}' || top == '[' && b[i] != ']' {
				return false
			}
			stack = stack[:len(stack)-1]
			i++
		}
	}
}

// objectKey reads `"key" :` at i and returns where its value starts.
func objectKey(b []byte, i int) (int, bool) {
	if i >= len(b) || b[i] != '"' {
		return i, false
	}
	i, ok := stringEnd(b, i)
	if !ok {
		return i, false
	}
	i = skipSpace(b, i)
	if i >= len(b) || b[i] != ':' {
		return i, false
	}
	return skipSpace(b, i+1), true
}

// stringEnd returns the end of the string at b[i] == '"': escapes valid,
// no control characters, any other byte accepted as json.Valid does.
func stringEnd(b []byte, i int) (int, bool) {
	for i++; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			return i + 1, true
		case c < 0x20:
			return i, false
		case c == '\\':
			i++
			if i >= len(b) {
				return i, false
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) || !isHex(b[i+1]) || !isHex(b[i+2]) || !isHex(b[i+3]) || !isHex(b[i+4]) {
					return i, false
				}
				i += 4
			default:
				return i, false
			}
		}
	}
	return i, false
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// numberEnd returns the end of the number at i: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
func numberEnd(b []byte, i int) (int, bool) {
	if b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && '1' <= b[i] && b[i] <= '9':
		i = digitsEnd(b, i)
	default:
		return i, false
	}
	if i < len(b) && b[i] == '.' {
		if i+1 >= len(b) || !isDigit(b[i+1]) {
			return i, false
		}
		i = digitsEnd(b, i+1)
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || !isDigit(b[i]) {
			return i, false
		}
		i = digitsEnd(b, i)
	}
	return i, true
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

func digitsEnd(b []byte, i int) int {
	for i < len(b) && isDigit(b[i]) {
		i++
	}
	return i
}

// literalEnd returns the end of lit at i, if it is there.
func literalEnd(b []byte, i int, lit string) (int, bool) {
	if len(b)-i < len(lit) || string(b[i:i+len(lit)]) != lit {
		return i, false
	}
	return i + len(lit), true
}
