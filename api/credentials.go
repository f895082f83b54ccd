package api

import "strings"

// HasCredential reports whether s holds something shaped like a client
// key (vgt_…) or a JWT (its header, base64 of {", starts with eyJ).
func HasCredential(s string) bool {
	return strings.Contains(s, "vgt_") || strings.Contains(s, "eyJ")
}

// PercentDecoded is s with every valid %XX escape decoded, again while
// some are left (up to three times): a credential encoded once or more
// shows, and a stray '%' elsewhere, which url.QueryUnescape refuses whole,
// hides nothing.
func PercentDecoded(s string) string {
	for range 3 {
		if !strings.Contains(s, "%") {
			return s
		}
		var b strings.Builder
		b.Grow(len(s))
		for i := 0; i < len(s); i++ {
			if s[i] == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
				b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
				i += 2
				continue
			}
			b.WriteByte(s[i])
		}
		if b.Len() == len(s) {
			return s // nothing was decoded
		}
		s = b.String()
	}
	return s
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c >= 'a':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// RedactCredentials replaces anything shaped like a client key or a JWT
// in s, for logs and the errors that repeat what a caller sent.
func RedactCredentials(s string) string {
	var b strings.Builder
	for {
		i, j := strings.Index(s, "vgt_"), strings.Index(s, "eyJ")
		if i < 0 || (j >= 0 && j < i) {
			i = j
		}
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		b.WriteString(s[:i])
		b.WriteString("REDACTED")
		end := i
		for end < len(s) && isTokenChar(s[end]) {
			end++
		}
		s = s[end:]
	}
}

// isTokenChar reports whether c may be part of a client key or a JWT.
func isTokenChar(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '_' || c == '-' || c == '.'
}
