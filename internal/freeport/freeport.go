// Package freeport hands out loopback TCP ports for the servers that
// tests, the demo and the benchmark start: Caddy, redis-server.
//
// A port found free by listening on port 0 and closing the listener may
// be found free by another process too before either binds it. Caddy
// binds with SO_REUSEPORT, so two test processes (go test runs packages
// in parallel) given the same port would share it without an error, each
// taking some of the other's connections. Take holds each port it returns
// with a lock on that port's byte of one file that every process using
// this package opens: the kernel releases the lock when the process ends.
package freeport

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

var (
	mu    sync.Mutex
	given = make(map[int]struct{}) // the ports Take returned
	locks *os.File                 // the file whose bytes are the locks; kept open, as its locks live with it
)

// lockFile is shared by every process of this user that uses this
// package on the machine (of the same temporary directory); one of its
// own per user, whom another's file would refuse.
var lockFile = filepath.Join(os.TempDir(), fmt.Sprintf("caddy-vigthoria-test-ports-%d.lock", os.Getuid()))

// Take returns a loopback TCP port that was free a moment ago, that this
// process never returned before, and that no other process holds through
// this package. The port stays held until the process exits.
func Take() (int, error) {
	mu.Lock()
	defer mu.Unlock()
	if locks == nil {
		f, err := os.OpenFile(lockFile, os.O_RDWR|os.O_CREATE, 0o666)
		if err != nil {
			return 0, fmt.Errorf("opening the ports' lock file: %w", err)
		}
		locks = f
	}
	for {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("finding a free port: %w", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if _, seen := given[port]; seen {
			continue
		}
		held, err := hold(locks, port)
		if err != nil {
			return 0, err
		}
		if held {
			given[port] = struct{}{}
			return port, nil
		}
	}
}

// hold takes the lock of port in f, and reports whether it got it: false
// when another process holds it. The locks are open file description
// locks, so that each process's open of the file is an owner of its own.
func hold(f *os.File, port int) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: int64(port), Len: 1}
	switch err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err {
	case nil:
		return true, nil
	case unix.EAGAIN, unix.EACCES:
		return false, nil
	default:
		return false, fmt.Errorf("locking port %d: %w", port, err)
	}
}
