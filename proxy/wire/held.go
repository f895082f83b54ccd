package wire

import "sync/atomic"

// held counts the bytes that the buffers of upstream answers hold in this
// process: streams' buffers (SSE) and JSON answers read whole. Like the
// request bodies' max_buffered, it is one number over every handler, so
// that no number of answers can take the process's memory.
var held atomic.Int64

// Held returns the bytes held by answers now.
func Held() int64 { return held.Load() }

// Take counts n bytes an answer holds whatever the bound: its first
// buffer, of a small fixed size, without which it could not be read.
func Take(n int64) { held.Add(n) }

// Hold counts n more bytes for an answer unless that would take the
// answers of the process past limit, and reports whether it did.
func Hold(n, limit int64) bool {
	if held.Add(n) > limit {
		held.Add(-n)
		return false
	}
	return true
}

// Release gives back n bytes counted by Take or Hold.
func Release(n int64) { held.Add(-n) }
