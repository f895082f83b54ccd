package policy

import (
	"errors"
	"strings"
	"unicode/utf8"
)

// ErrBadGlob is the error of a model glob that is not well formed: an
// unclosed or empty class, or a trailing backslash.
var ErrBadGlob = errors.New("syntax error in model glob")

// MatchModel reports whether a model glob matches a whole model name.
// It is the one rule of every model glob: prices, tiers' models, keys'
// models and minted tokens' models. The syntax is path.Match's, but no
// character is a separator: '*' matches any run of characters, '/'
// included, so that "*" is every model and "org/*" every model of org;
// '?' matches one character; '[abc]', '[a-z]' and '[^a-z]' one character
// of a class; '\' makes the next character literal. Matching is
// case-sensitive. A malformed glob matches nothing (see CheckGlob). It
// allocates nothing.
func MatchModel(glob, name string) bool {
	// The classic backtracking match: on a mismatch, the last '*' takes
	// one more character and matching goes on after it.
	star, starName := -1, 0
	g, n := 0, 0
	for n < len(name) || g < len(glob) {
		if g < len(glob) {
			switch glob[g] {
			case '*':
				star, starName = g, n
				g++
				continue
			case '?':
				if n < len(name) {
					_, w := utf8.DecodeRuneInString(name[n:])
					g, n = g+1, n+w
					continue
				}
			case '[':
				if n < len(name) {
					r, w := utf8.DecodeRuneInString(name[n:])
					ok, end := matchClass(glob, g, r)
					if end < 0 {
						return false
					}
					if ok {
						g, n = end, n+w
						continue
					}
				}
			case '\\':
				if g+1 == len(glob) {
					return false
				}
				_, w := utf8.DecodeRuneInString(glob[g+1:])
				if strings.HasPrefix(name[n:], glob[g+1:g+1+w]) {
					g, n = g+1+w, n+w
					continue
				}
			default:
				if n < len(name) && name[n] == glob[g] {
					g, n = g+1, n+1
					continue
				}
			}
		}
		if star < 0 || starName >= len(name) {
			return false
		}
		starName++ // by byte, as path.Match
		g, n = star+1, starName
	}
	return true
}

// matchClass matches r against the class that opens at glob[i] ('['):
// whether it matches, and where the class ends (after its ']'); end is
// -1 when the class is malformed.
func matchClass(glob string, i int, r rune) (ok bool, end int) {
	i++
	negated := i < len(glob) && glob[i] == '^'
	if negated {
		i++
	}
	for items := 0; ; items++ {
		if i < len(glob) && glob[i] == ']' && items > 0 {
			return ok != negated, i + 1
		}
		lo, next := classRune(glob, i)
		if next < 0 {
			return false, -1
		}
		hi := lo
		if next < len(glob) && glob[next] == '-' {
			if hi, next = classRune(glob, next+1); next < 0 {
				return false, -1
			}
		}
		if lo <= r && r <= hi {
			ok = true
		}
		i = next
	}
}

// classRune reads one character of a class at glob[i], escaped or not,
// and where the next starts; next is -1 for none or a bare '-' or ']'.
func classRune(glob string, i int) (r rune, next int) {
	if i >= len(glob) || glob[i] == '-' || glob[i] == ']' {
		return 0, -1
	}
	if glob[i] == '\\' {
		if i++; i >= len(glob) {
			return 0, -1
		}
	}
	r, w := utf8.DecodeRuneInString(glob[i:])
	return r, i + w
}

// CheckGlob reports ErrBadGlob for a glob MatchModel cannot read.
func CheckGlob(glob string) error {
	for i := 0; i < len(glob); i++ {
		switch glob[i] {
		case '\\':
			if i++; i == len(glob) {
				return ErrBadGlob
			}
		case '[':
			_, end := matchClass(glob, i, 0)
			if end < 0 {
				return ErrBadGlob
			}
			i = end - 1
		}
	}
	return nil
}

// IsLiteralGlob reports whether a glob has no special characters: it
// matches the one name equal to it.
func IsLiteralGlob(glob string) bool {
	for i := 0; i < len(glob); i++ {
		switch glob[i] {
		case '*', '?', '[', '\\':
			return false
		}
	}
	return true
}
