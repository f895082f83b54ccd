package main

import (
	"os"
	"path/filepath"
	"testing"
)

const testSoak = soakBegin + "\n## Soak\n\nfigures\n" + soakEnd + "\n"

func TestWithSoakSection(t *testing.T) {
	const fresh = soakBegin + "\n## Soak\n\nnew figures\n" + soakEnd + "\n"
	cases := []struct {
		name, doc, want string
	}{
		{"empty file", "", fresh},
		{"appended", "# Benchmarks\n\ntext\n", "# Benchmarks\n\ntext\n\n" + fresh},
		{"replaced at the end", "# Benchmarks\n\n" + testSoak, "# Benchmarks\n\n" + fresh},
		{"replaced in the middle", "# Benchmarks\n\n" + testSoak + "\n## After\n", "# Benchmarks\n\n" + fresh + "\n## After\n"},
		{"without a newline after it", "# B\n\n" + testSoak[:len(testSoak)-1], "# B\n\n" + fresh},
		{"an end marker missing is no section", "# B\n" + soakBegin + "\nhalf\n", "# B\n" + soakBegin + "\nhalf\n\n" + fresh},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := string(withSection([]byte(tc.doc), []byte(fresh), soakBegin, soakEnd)); got != tc.want {
				t.Errorf("got\n%q\nwant\n%q", got, tc.want)
			}
		})
	}
}

// The benchmark's report replaces the file but keeps the soak's section.
func TestWriteKeepingSoak(t *testing.T) {
	const bench = "# Benchmarks\n\nnew run\n"
	cases := []struct {
		name string
		old  *string // nil: no file yet
		want string
	}{
		{"no file", nil, bench},
		{"no soak section", ptr("# Benchmarks\n\nold run\n"), bench},
		{"soak section kept", ptr("# Benchmarks\n\nold run\n\n" + testSoak), bench + "\n" + testSoak},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "BENCHMARKS.md")
			if tc.old != nil {
				if err := os.WriteFile(path, []byte(*tc.old), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if err := writeKeepingSoak(path, []byte(bench)); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("got\n%q\nwant\n%q", got, tc.want)
			}
		})
	}
}

func ptr(s string) *string { return &s }

func TestParseGoroutineTotal(t *testing.T) {
	if got, err := parseGoroutineTotal([]byte("goroutine profile: total 42\n7 @ 0x1 0x2\n")); got != 42 || err != nil {
		t.Errorf("got %d, %v; want 42, nil", got, err)
	}
	if _, err := parseGoroutineTotal([]byte("<html>not found</html>")); err == nil {
		t.Error("a page that is no profile parsed, want an error")
	}
}

func TestParseHeapAlloc(t *testing.T) {
	profile := []byte("heap profile: 1: 2 [3: 4] @ heap/1048576\n\n# runtime.MemStats\n# Alloc = 5\n# HeapAlloc = 7340032\n# Sys = 9\n")
	if got, err := parseHeapAlloc(profile); got != 7<<20 || err != nil {
		t.Errorf("got %d, %v; want %d, nil", got, err, 7<<20)
	}
	if _, err := parseHeapAlloc([]byte("heap profile: 0: 0 [0: 0] @ heap/1048576\n")); err == nil {
		t.Error("a profile without MemStats parsed, want an error")
	}
}

func TestStatusBytes(t *testing.T) {
	status := []byte("Name:\tcaddy\nVmHWM:\t   80000 kB\nVmRSS:\t   65536 kB\n")
	if got, err := statusBytes(status, "VmRSS:"); got != 64<<20 || err != nil {
		t.Errorf("VmRSS = %d, %v; want %d, nil", got, err, 64<<20)
	}
	if _, err := statusBytes(status, "VmSwap:"); err == nil {
		t.Error("a missing field read, want an error")
	}
}
