package tests

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"runtime/metrics"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// floodBody is what each connection of a flood sends of a body that
// announces 10 MB: the buffer that holds it has grown to 4 MiB.
const (
	floodBody = 4_000_000
	floodHeld = 4 << 20
)

// flood opens conns connections to addr from the loopback addresses
// 127.0.0.<first>… (spread evenly over addrs of them), each sending the
// headers of a chat announcing 10 MB of body, then floodBody bytes of
// it, and never the rest. It returns once every connection is either
// refused (its answer read) or holds its whole floodBody in Caddy,
// which runs in this process, and returns how many were refused.
// Nothing else may start or end a body while it runs.
func flood(t *testing.T, addr string, first, addrs, conns int, header string) (refused int) {
	t.Helper()
	before := proxy.BufferedBytes()
	var mu sync.Mutex
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	for i := range conns {
		local := &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(first+i%addrs))}
		conn, err := (&net.Dialer{LocalAddr: local}).Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dialling %s from %s: %v", addr, local, err)
		}
		t.Cleanup(func() { conn.Close() })
		wg.Go(func() {
			fmt.Fprintf(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n%s\r\n{", addr, header)
			chunk := make([]byte, 64<<10)
			for sent := 1; sent < floodBody; sent += len(chunk) {
				if _, err := conn.Write(chunk[:min(len(chunk), floodBody-sent)]); err != nil {
					return // refused: the answer is read below
				}
			}
		})
		wg.Go(func() {
			res, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				return // closed when the test ends: it was held
			}
			res.Body.Close()
			if res.StatusCode != http.StatusServiceUnavailable {
				t.Errorf("a flooding body: status %d, want 503 or none", res.StatusCode)
			}
			mu.Lock()
			refused++
			mu.Unlock()
		})
	}
	// Every body either refused or held whole: the process holds exactly
	// floodHeld for each body not refused.
	deadline := time.Now().Add(30 * time.Second)
	for {
		mu.Lock()
		n := refused
		mu.Unlock()
		if proxy.BufferedBytes()-before == int64(conns-n)*floodHeld {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("the flood did not settle: %d of %d bodies refused, %d bytes held", n, conns, proxy.BufferedBytes()-before)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// liveHeap is the Go heap that a collection left live, in bytes.
func liveHeap() int64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return int64(s[0].Value.Uint64())
}

// chats sends n small chats with key, one after the other, and returns
// how many were answered.
func chats(t *testing.T, url, key string, n int) (ok int) {
	t.Helper()
	client := newClient(url, key)
	for range n {
		if _, err := client.Chat.Completions.New(t.Context(), chatParams("still served?")); err == nil {
			ok++
		}
	}
	return ok
}

// TestBodyBudgetIsShared floods the proxy with large bodies that trickle
// in, as a cheap caller can, and checks that memory before admission is
// shared: anonymous callers from eight addresses hold at most their
// tier's share of max_buffered, one pro key at most its own ceiling
// within pro's share, and another pro key is served meanwhile.
func TestBodyBudgetIsShared(t *testing.T) {
	e, keys := startWithKeys(t, []string{"pro"}, "anonymous free", "body_timeout 10m") // the flood stays
	addr := strings.TrimPrefix(e.caddy.URL, "http://")
	const conns, sent = 16, 30
	base := liveHeap()

	// The defaults: 64 MiB in all; the anonymous tier gets one largest
	// body's worth (max_body, 10 MB), pro the rest, and one pro caller a
	// quarter of pro's share.
	refused := flood(t, addr, 2, 8, conns, "")
	anonymous := proxy.BufferedBytes()
	anonymousHeap := liveHeap() - base
	if anonymous > 10_000_000 {
		t.Errorf("anonymous callers hold %d bytes of bodies, want at most their tier's share of 10000000", anonymous)
	}
	if ok := chats(t, e.caddy.URL, e.key, sent); ok != sent {
		t.Errorf("a pro key while anonymous callers flood: %d of %d chats answered, want all", ok, sent)
	}

	refusedPro := flood(t, addr, 20, 1, conns, "Authorization: Bearer "+keys[0]+"\r\n")
	pro := proxy.BufferedBytes() - anonymous
	if pro > (64<<20-10_000_000)/4 {
		t.Errorf("one pro key holds %d bytes of bodies, want at most a quarter of pro's share, %d", pro, (64<<20-10_000_000)/4)
	}
	if ok := chats(t, e.caddy.URL, e.key, sent); ok != sent {
		t.Errorf("a pro key while another pro key floods too: %d of %d chats answered, want all", ok, sent)
	}
	t.Logf("anonymous flood: %d of %d bodies refused, %d bytes held, live heap +%d MB; one pro key's: %d refused, %d bytes held; live heap +%d MB in all",
		refused, conns, anonymous, anonymousHeap>>20, refusedPro, pro, (liveHeap()-base)>>20)
}
