//go:build race

package tests

// raceBuild says the tests run with the race detector, which keeps
// bookkeeping of twice the size of every goroutine stack.
const raceBuild = true
