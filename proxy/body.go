package proxy

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Body buffers start small and double as bytes arrive: what a body holds
// follows what its caller really sent, never what it announced.
const (
	firstBodyChunk = 8 << 10
	// maxPooledBody keeps one huge request from pinning its buffer in the pool.
	maxPooledBody = 256 << 10
)

var bodyPool = sync.Pool{New: func() any { return &bodyBuf{data: make([]byte, 0, firstBodyChunk)} }}

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

// Body is a request body read whole into memory, at most the configured
// limit: read once, so that policy can inspect it and the upstream gets
// exactly these bytes.
type Body struct {
	buf  *bodyBuf
	held int64 // bytes of buffered counted for this body
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
	if cap(b.buf.data) <= maxPooledBody {
		b.buf.data = b.buf.data[:0]
		b.buf.rd.Reset(nil)
		bodyPool.Put(b.buf)
	}
	b.buf, b.held = nil, 0
}

// grow makes room for more bytes, doubling the buffer up to the body's
// size limit, if the process budget has room for the new capacity.
func (b *Body) grow(lim *BodyLimits) bool {
	buf := b.buf.data
	newCap := min(max(2*int64(cap(buf)), firstBodyChunk), lim.Size)
	if !b.hold(newCap-int64(cap(buf)), lim.MaxBuffered) {
		return false
	}
	bigger := make([]byte, len(buf), newCap)
	copy(bigger, buf)
	b.buf.data = bigger
	return true
}

// hold counts n more bytes against the process budget, unless that would
// pass limit.
func (b *Body) hold(n, limit int64) bool {
	if buffered.Add(n) > limit {
		buffered.Add(-n)
		return false
	}
	b.held += n
	return true
}

// ReadBody reads r's body within lim: refused with 413 before a byte is
// read when Content-Length passes the size, and as soon as the size is
// crossed otherwise; 408 when it takes longer than the timeout; 503 when
// the process holds too many bytes of bodies already. Memory grows with
// the bytes that arrive, whatever Content-Length announces. On success
// r.Body replays the bytes read.
func ReadBody(w http.ResponseWriter, r *http.Request, lim *BodyLimits) (Body, *APIError) {
	if r.ContentLength > lim.Size {
		w.Header().Set("Connection", "close")
		return Body{}, TooLarge(lim.Size)
	}
	if lim.Timeout > 0 && !serverTimesOutFirst(r, lim.Timeout) {
		if setReadDeadline(w, time.Now().Add(lim.Timeout)) == nil {
			defer setReadDeadline(w, time.Time{})
		}
	}
	b := Body{buf: bodyPool.Get().(*bodyBuf)}
	apiErr := errBodiesBusy
	if b.hold(int64(cap(b.buf.data)), lim.MaxBuffered) {
		apiErr = b.readFrom(r.Body, lim)
	}
	if apiErr != nil {
		b.Release()
		// The rest of the body is not read: the connection cannot serve
		// another request.
		w.Header().Set("Connection", "close")
		if apiErr == errBodiesBusy {
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

func (b *Body) readFrom(src io.Reader, lim *BodyLimits) *APIError {
	for {
		buf := b.buf.data
		if len(buf) == cap(buf) {
			if int64(len(buf)) >= lim.Size {
				return b.wantEOF(src, lim)
			}
			if !b.grow(lim) {
				return errBodiesBusy
			}
			buf = b.buf.data
		}
		n, err := src.Read(buf[len(buf):cap(buf)])
		b.buf.data = buf[:len(buf)+n]
		switch {
		case int64(len(b.buf.data)) > lim.Size: // a pooled buffer may be larger
			return TooLarge(lim.Size)
		case err == io.EOF:
			return nil
		case err != nil:
			return errBodyUnreadable(err)
		}
	}
}

// wantEOF checks that a body of exactly the size limit ends there.
func (b *Body) wantEOF(src io.Reader, lim *BodyLimits) *APIError {
	var one [1]byte
	for {
		n, err := src.Read(one[:])
		switch {
		case n > 0:
			return TooLarge(lim.Size)
		case err == io.EOF:
			return nil
		case err != nil:
			return errBodyUnreadable(err)
		}
	}
}

// errBodiesBusy refuses a body while the process holds as many bytes of
// bodies as it may: the caller may try again shortly.
var errBodiesBusy = &APIError{
	Status:  http.StatusServiceUnavailable,
	Type:    TypeAPI,
	Code:    "proxy_busy",
	Message: "The proxy is receiving too much request data right now. Please try again shortly.",
}

var errBodyTimeout = &APIError{
	Status:  http.StatusRequestTimeout,
	Type:    TypeInvalidRequest,
	Code:    "request_timeout",
	Message: "The request body did not arrive in time.",
}

func errBodyUnreadable(err error) *APIError {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return errBodyTimeout
	}
	msg := "The request body could not be read."
	if errors.Is(err, io.ErrUnexpectedEOF) {
		msg = "The request body ended before its announced length."
	}
	return &APIError{Status: http.StatusBadRequest, Type: TypeInvalidRequest, Code: "invalid_body", Message: msg}
}
