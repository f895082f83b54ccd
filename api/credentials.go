package api

import "strings"

// HasCredential reports whether s holds something shaped like a client
// key (vgt_…) or a JWT (its header, base64 of {", starts with eyJ).
func HasCredential(s string) bool {
	return strings.Contains(s, "vgt_") || strings.Contains(s, "eyJ")
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
