// Package clientkey is the format of client keys: "vgt_", 32 random
// base62 characters and 6 base62 characters of their CRC32, how they are
// made, checked without allocating, and read from an Authorization
// header. It imports nothing but the standard library, so that its fuzz
// targets build in seconds.
package clientkey

import (
	"crypto/rand"
	"fmt"
	"hash/crc32"
	"strings"
)

// The shape of a client key: Prefix, bodyLen random base62 characters,
// then sumLen base62 characters of the body's CRC32.
const (
	Prefix  = "vgt_"
	bodyLen = 32
	sumLen  = 6
	// Len is the length of every client key.
	Len = len(Prefix) + bodyLen + sumLen
)

const base62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// base62Value maps a byte to its base62 digit value, or -1.
var base62Value = func() (t [256]int8) {
	for i := range t {
		t[i] = -1
	}
	for i := range len(base62) {
		t[base62[i]] = int8(i)
	}
	return t
}()

// New returns a new client key: "vgt_", 32 random base62
// characters, and 6 base62 characters of their CRC32 checksum.
func New() (string, error) {
	var b [Len]byte
	copy(b[:], Prefix)
	body := b[len(Prefix) : len(Prefix)+bodyLen]
	if err := RandomBase62(body); err != nil {
		return "", err
	}
	putChecksum(b[len(Prefix)+bodyLen:], checksum(string(body)))
	return string(b[:]), nil
}

// Valid reports whether s has the shape of a client key: its prefix,
// length, alphabet and checksum. It does not allocate, so that a mistyped
// or invented key is refused before any hashing or lookup.
func Valid(s string) bool {
	if len(s) != Len || s[:len(Prefix)] != Prefix {
		return false
	}
	const sumAt = len(Prefix) + bodyLen
	for i := len(Prefix); i < sumAt; i++ {
		if base62Value[s[i]] < 0 {
			return false
		}
	}
	// Decoding the six digits is one-to-one, and cheaper than encoding
	// the checksum to compare.
	var sum uint64
	for i := sumAt; i < len(s); i++ {
		d := base62Value[s[i]]
		if d < 0 {
			return false
		}
		sum = sum*62 + uint64(d)
	}
	return sum == uint64(checksum(s[len(Prefix):sumAt]))
}

// crcTables extend crc32.IEEETable for slicing-by-8: crcTables[k][b] is
// the CRC of byte b followed by k zero bytes.
var crcTables = func() (t [8][256]uint32) {
	t[0] = *crc32.IEEETable
	for b := range 256 {
		crc := t[0][b]
		for k := 1; k < 8; k++ {
			crc = t[0][byte(crc)] ^ crc>>8
			t[k][b] = crc
		}
	}
	return t
}()

// checksum is the CRC32 (IEEE) of s, eight bytes a step. hash/crc32
// would need s as a slice, which escapes to the heap.
func checksum(s string) uint32 {
	crc := ^uint32(0)
	for ; len(s) >= 8; s = s[8:] {
		crc ^= uint32(s[0]) | uint32(s[1])<<8 | uint32(s[2])<<16 | uint32(s[3])<<24
		crc = crcTables[7][byte(crc)] ^ crcTables[6][byte(crc>>8)] ^
			crcTables[5][byte(crc>>16)] ^ crcTables[4][crc>>24] ^
			crcTables[3][s[4]] ^ crcTables[2][s[5]] ^ crcTables[1][s[6]] ^ crcTables[0][s[7]]
	}
	for i := range len(s) {
		crc = crcTables[0][byte(crc)^s[i]] ^ crc>>8
	}
	return ^crc
}

// putChecksum writes sum in base62 into dst, most significant digit first,
// left-padded with '0'. Six digits hold any uint32 (62^6 > 2^32).
func putChecksum(dst []byte, sum uint32) {
	for i := len(dst) - 1; i >= 0; i-- {
		dst[i] = base62[sum%62]
		sum /= 62
	}
}

// RandomBase62 fills dst with uniformly random base62 characters.
func RandomBase62(dst []byte) error {
	// Bytes at or above 248 (4*62) are dropped so that every character is
	// equally likely.
	var buf [64]byte
	for n := 0; n < len(dst); {
		if _, err := rand.Read(buf[:]); err != nil {
			return fmt.Errorf("reading random bytes: %w", err)
		}
		for _, c := range buf {
			if c >= 248 {
				continue
			}
			dst[n] = base62[c%62]
			if n++; n == len(dst) {
				break
			}
		}
	}
	return nil
}

// FromAuthorization returns the bearer token of a request's
// Authorization header values: exactly one header, the scheme Bearer (in
// any case), exactly one space and a token68 (RFC 9110 §11.2), nothing
// else. It does not allocate.
func FromAuthorization(values []string) (secret string, ok bool) {
	const scheme = "Bearer "
	if len(values) != 1 {
		return "", false
	}
	v := values[0]
	if len(v) <= len(scheme) || !strings.EqualFold(v[:len(scheme)-1], scheme[:len(scheme)-1]) || v[len(scheme)-1] != ' ' {
		return "", false
	}
	token := v[len(scheme):]
	// token68: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
	end := len(token)
	for end > 0 && token[end-1] == '=' {
		end--
	}
	if end == 0 {
		return "", false
	}
	for i := range end {
		switch c := token[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '-', c == '.', c == '_', c == '~', c == '+', c == '/':
		default:
			return "", false
		}
	}
	return token, true
}
