package proxy

import (
	"bytes"
	"errors"
	"hash/maphash"
	"io"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/vigthoria/caddy-vigthoria/api"
)

// Body buffers start small and double as bytes arrive: what a body holds
// follows what its caller really sent, never what it announced.
const (
	firstBodyChunk = 8 << 10
	// pooledClasses are the sizes pooled, 8 KiB to 256 KiB: each has a
	// pool of its own, so that a small body never holds (and is never
	// counted for) a large buffer, and one huge request does not pin its
	// buffer in a pool.
	pooledClasses = 6
)

// MinBuffered is the least a body holds: its first chunk.
const MinBuffered = firstBodyChunk

// bodyPools hold buffers by size class: class c has capacity 8 KiB << c.
var bodyPools [pooledClasses]sync.Pool

// getBuf returns an empty buffer of class c.
func getBuf(c int) *bodyBuf {
	if b, ok := bodyPools[c].Get().(*bodyBuf); ok {
		return b
	}
	return &bodyBuf{data: make([]byte, 0, firstBodyChunk<<c)}
}

// putBuf pools b when its capacity is one of the classes.
func putBuf(b *bodyBuf) {
	c := sizeClass(cap(b.data))
	if c < 0 {
		return
	}
	b.data = b.data[:0]
	b.rd.Reset(nil)
	bodyPools[c].Put(b)
}

// sizeClass is the class of a buffer of capacity n, or -1 when none.
func sizeClass(n int) int {
	for c := range pooledClasses {
		if n == firstBodyChunk<<c {
			return c
		}
	}
	return -1
}

// bodyBuf holds a body's bytes and replays them as the request's body:
// pooled whole, so that neither costs an allocation per request.
type bodyBuf struct {
	data []byte
	rd   bytes.Reader
}

func (b *bodyBuf) Read(p []byte) (int, error) { return b.rd.Read(p) }
func (b *bodyBuf) Close() error               { return nil }

// buffered counts the bytes held by request bodies in flight in this
// process, over every handler, for BodyLimits.MaxBuffered.
var buffered atomic.Int64

// BufferedBytes returns the bytes held by request bodies in flight.
func BufferedBytes() int64 { return buffered.Load() }

// BodyLimits bound what reading one request body may cost.
type BodyLimits struct {
	// Size is the largest body accepted, in bytes.
	Size int64
	// Timeout bounds the time to receive the whole body; zero: none.
	Timeout time.Duration
	// MaxBuffered bounds the bytes that all bodies in flight in the
	// process may hold at once; a body that would pass it is refused.
	MaxBuffered int64
}

// Share is a tier's part of the memory that bodies may hold, and the
// most that one of its callers may hold of it. Bytes are counted from a
// body's first byte until it is released, so that a flood of bodies
// trickling in fills only its own tier's share, and one caller only its
// own part of it. Safe for concurrent use; make it with Callers.Share.
type Share struct {
	max, perCaller int64
	held           atomic.Int64
	callers        *Callers
}

// Held returns the bytes that bodies of the share hold.
func (s *Share) Held() int64 { return s.held.Load() }

// callerShards spreads the callers over locks: a lock covers 1/64 of
// them, held for a map update.
const callerShards = 64

// Callers counts the bytes each caller's bodies hold, over the shares
// made from it. A caller has an entry only while its bodies hold bytes,
// so that entries are bounded by the bodies in flight (each holds at
// least one first chunk), never by how many callers there are. The zero
// value is not usable: make it with NewCallers. Safe for concurrent use.
type Callers struct {
	seed   maphash.Seed
	shards [callerShards]struct {
		mu   sync.Mutex
		held map[string]int64 // by caller; guarded by mu
		_    [48]byte         // 64 bytes: a cache line of its own
	}
}

// NewCallers returns an empty count of callers.
func NewCallers() *Callers {
	c := &Callers{seed: maphash.MakeSeed()}
	for i := range c.shards {
		c.shards[i].held = make(map[string]int64)
	}
	return c
}

// Share makes a share of max bytes, of which one caller holds at most
// perCaller.
func (c *Callers) Share(max, perCaller int64) *Share {
	return &Share{max: max, perCaller: perCaller, callers: c}
}

// Len returns how many callers hold bytes.
func (c *Callers) Len() int {
	n := 0
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		n += len(sh.held)
		sh.mu.Unlock()
	}
	return n
}

// add counts n more bytes (fewer when negative) for caller, unless that
// would pass ceiling; an entry goes when its caller holds nothing.
func (c *Callers) add(caller string, n, ceiling int64) bool {
	sh := &c.shards[maphash.String(c.seed, caller)%callerShards]
	sh.mu.Lock()
	held := sh.held[caller] + n
	ok := n <= 0 || held <= ceiling
	switch {
	case !ok:
	case held <= 0:
		delete(sh.held, caller)
	default:
		sh.held[caller] = held
	}
	sh.mu.Unlock()
	return ok
}

// Holder names what a body's bytes count against besides the process:
// its tier's share and its caller. A zero Holder counts them against the
// process only.
type Holder struct {
	Share  *Share
	Caller string
}

// Body is a request body read whole into memory, at most the configured
// limit: read once, so that policy can inspect it and the upstream gets
// exactly these bytes.
type Body struct {
	buf  *bodyBuf
	held int64 // bytes of buffered counted for this body, and of its holder's
	who  Holder
}

// Bytes returns the body; valid until Release.
func (b *Body) Bytes() []byte { return b.buf.data }

// Release returns the body's storage to the pool and its bytes to the
// process budget. The request must be done with it, its r.Body included,
// which replays the pooled storage: call it after forwarding has
// returned, and set r.Body to http.NoBody.
func (b *Body) Release() {
	if b.buf == nil {
		return
	}
	buffered.Add(-b.held)
	if s := b.who.Share; s != nil && b.held > 0 {
		s.release(b.who.Caller, b.held)
	}
	putBuf(b.buf)
	b.buf, b.held, b.who = nil, 0, Holder{}
}

// Compact makes a body that is to wait hold no more than the bytes it
// sends: c.Body (the body read, or policy's rewrite of it) moves into
// storage of its own length when it is the pooled buffer's, the buffer
// goes back to its pool, and the budgets count len(c.Body) in place of
// the buffer's capacity. A queue of small requests then holds what they
// are, not a first chunk each. r.Body replays c.Body.
func (b *Body) Compact(r *http.Request, c *Call) {
	if b.buf == nil || int64(len(c.Body)) >= b.held {
		return
	}
	own := c.Body
	if data := b.buf.data; len(own) > 0 && len(data) > 0 && &own[0] == &data[0] {
		own = bytes.Clone(own)
		c.Body = own
		r.Body = io.NopCloser(bytes.NewReader(own))
	}
	give := b.held - int64(len(own))
	buffered.Add(-give)
	if s := b.who.Share; s != nil {
		s.release(b.who.Caller, give)
	}
	b.held -= give
	putBuf(b.buf)
	b.buf = &bodyBuf{} // not pooled: its capacity is no class
}

// grow makes room for more bytes, doubling the buffer up to the body's
// size limit, if the budgets have room for the new capacity.
func (b *Body) grow(lim *BodyLimits) *api.Error {
	buf := b.buf.data
	newCap := min(max(2*int64(cap(buf)), firstBodyChunk), lim.Size)
	if apiErr := b.hold(newCap-int64(cap(buf)), lim.MaxBuffered); apiErr != nil {
		return apiErr
	}
	if c := sizeClass(int(newCap)); c >= 0 {
		// The pooled buffer of the next class takes the bytes; the
		// smaller one goes back to its own pool.
		next := getBuf(c)
		next.data = append(next.data, buf...)
		b.buf.data, next.data = next.data, buf
		putBuf(next)
		return nil
	}
	bigger := make([]byte, len(buf), newCap)
	copy(bigger, buf)
	b.buf.data = bigger
	return nil
}

// hold counts n more bytes against the body's caller, its tier's share
// and the process, unless that would pass one of their ceilings (the
// process's is limit).
func (b *Body) hold(n, limit int64) *api.Error {
	s := b.who.Share
	if s != nil {
		if !s.callers.add(b.who.Caller, n, s.perCaller) {
			return errCallerBusy
		}
		if s.held.Add(n) > s.max {
			s.release(b.who.Caller, n)
			return errBodiesBusy
		}
	}
	if buffered.Add(n) > limit {
		buffered.Add(-n)
		if s != nil {
			s.release(b.who.Caller, n)
		}
		return errBodiesBusy
	}
	b.held += n
	return nil
}

// release gives back n bytes that caller held of the share.
func (s *Share) release(caller string, n int64) {
	s.held.Add(-n)
	s.callers.add(caller, -n, 0)
}

// ReadBody reads r's body within lim: refused with 413 before a byte is
// read when Content-Length passes the size, and as soon as the size is
// crossed otherwise; 408 when it takes longer than the timeout; 503 when
// its caller, its tier's share or the process holds too many bytes of
// bodies already. Memory grows with the bytes that arrive, whatever
// Content-Length announces, and is counted against who. On success
// r.Body replays the bytes read.
func ReadBody(w http.ResponseWriter, r *http.Request, lim *BodyLimits, who Holder) (Body, *api.Error) {
	if r.ContentLength > lim.Size {
		w.Header().Set("Connection", "close")
		return Body{}, api.TooLarge(lim.Size)
	}
	if lim.Timeout > 0 && !serverTimesOutFirst(r, lim.Timeout) {
		if setReadDeadline(w, time.Now().Add(lim.Timeout)) == nil {
			defer setReadDeadline(w, time.Time{})
		}
	}
	b := Body{buf: getBuf(0), who: who}
	apiErr := b.hold(int64(cap(b.buf.data)), lim.MaxBuffered)
	if apiErr == nil {
		apiErr = b.readFrom(r.Body, lim)
	}
	if apiErr != nil {
		b.Release()
		// The rest of the body is not read: the connection cannot serve
		// another request.
		w.Header().Set("Connection", "close")
		if apiErr == errBodiesBusy || apiErr == errCallerBusy {
			w.Header().Set("Retry-After", "1")
		}
		return Body{}, apiErr
	}
	b.buf.rd.Reset(b.buf.data)
	r.Body = b.buf
	r.ContentLength = int64(len(b.buf.data))
	r.Header.Del("Transfer-Encoding")
	return b, nil
}

// setReadDeadline is http.ResponseController's SetReadDeadline without
// the controller, which would cost an allocation per request.
func setReadDeadline(w http.ResponseWriter, t time.Time) error {
	for {
		switch rw := w.(type) {
		case interface{ SetReadDeadline(time.Time) error }:
			return rw.SetReadDeadline(t)
		case interface{ Unwrap() http.ResponseWriter }:
			w = rw.Unwrap()
		default:
			return http.ErrNotSupported
		}
	}
}

// serverTimesOutFirst reports whether the server's own read_timeout, which
// runs from the start of the request, ends no later than timeout would: a
// body deadline must never extend what the operator set for the server.
func serverTimesOutFirst(r *http.Request, timeout time.Duration) bool {
	srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	return ok && srv.ReadTimeout > 0 && time.Duration(srv.ReadTimeout) <= timeout
}

func (b *Body) readFrom(src io.Reader, lim *BodyLimits) *api.Error {
	for {
		buf := b.buf.data
		if len(buf) == cap(buf) {
			if int64(len(buf)) >= lim.Size {
				return b.wantEOF(src, lim)
			}
			if apiErr := b.grow(lim); apiErr != nil {
				return apiErr
			}
			buf = b.buf.data
		}
		n, err := src.Read(buf[len(buf):cap(buf)])
		b.buf.data = buf[:len(buf)+n]
		switch {
		case int64(len(b.buf.data)) > lim.Size: // a pooled buffer may be larger
			return api.TooLarge(lim.Size)
		case err == io.EOF:
			return nil
		case err != nil:
			return errBodyUnreadable(err)
		}
	}
}

// wantEOF checks that a body of exactly the size limit ends there.
func (b *Body) wantEOF(src io.Reader, lim *BodyLimits) *api.Error {
	var one [1]byte
	for {
		n, err := src.Read(one[:])
		switch {
		case n > 0:
			return api.TooLarge(lim.Size)
		case err == io.EOF:
			return nil
		case err != nil:
			return errBodyUnreadable(err)
		}
	}
}

// errBodiesBusy refuses a body while the process, or its tier's share,
// holds as many bytes of bodies as it may: the caller may try again
// shortly.
var errBodiesBusy = &api.Error{
	Status:  http.StatusServiceUnavailable,
	Type:    api.TypeAPI,
	Code:    "proxy_busy",
	Message: "The proxy is receiving too much request data right now. Please try again shortly.",
}

// errCallerBusy refuses a body while its caller's bodies hold as many
// bytes as one caller may: it may send it again once they are done.
var errCallerBusy = &api.Error{
	Status:  http.StatusServiceUnavailable,
	Type:    api.TypeAPI,
	Code:    "proxy_busy",
	Message: "Your requests being received hold as much request data as this proxy allows one caller. Please try again once they are done.",
}

var errBodyTimeout = &api.Error{
	Status:  http.StatusRequestTimeout,
	Type:    api.TypeInvalidRequest,
	Code:    "request_timeout",
	Message: "The request body did not arrive in time.",
}

func errBodyUnreadable(err error) *api.Error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return errBodyTimeout
	}
	msg := "The request body could not be read."
	if errors.Is(err, io.ErrUnexpectedEOF) {
		msg = "The request body ended before its announced length."
	}
	return &api.Error{Status: http.StatusBadRequest, Type: api.TypeInvalidRequest, Code: "invalid_body", Message: msg}
}
