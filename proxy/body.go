package proxy

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"sync"
)

var bodyPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// maxPooledBody keeps one huge request from pinning its buffer in the pool.
const maxPooledBody = 256 << 10

// Body is a request body read whole into memory, at most the configured
// limit: read once, so that policy can inspect it and the upstream gets
// exactly these bytes.
type Body struct {
	buf *bytes.Buffer
}

// Bytes returns the body; valid until Release.
func (b *Body) Bytes() []byte { return b.buf.Bytes() }

// Release returns the body's storage to the pool. The request must be done
// with it: call it after forwarding has returned.
func (b *Body) Release() {
	if b.buf.Cap() <= maxPooledBody {
		b.buf.Reset()
		bodyPool.Put(b.buf)
	}
	b.buf = nil
}

// ReadBody reads r's body, refusing one over limit bytes before reading it
// when Content-Length tells, and as soon as the limit is crossed otherwise.
// On success r.Body replays the bytes read.
func ReadBody(r *http.Request, limit int64) (Body, *APIError) {
	if r.ContentLength > limit {
		return Body{}, TooLarge(limit)
	}
	buf := bodyPool.Get().(*bytes.Buffer)
	if r.ContentLength > 0 {
		buf.Grow(int(r.ContentLength))
	}
	_, err := buf.ReadFrom(io.LimitReader(r.Body, limit+1))
	b := Body{buf: buf}
	switch {
	case err != nil:
		b.Release()
		return Body{}, errBodyUnreadable(err)
	case int64(buf.Len()) > limit:
		b.Release()
		return Body{}, TooLarge(limit)
	}
	r.Body = io.NopCloser(bytes.NewReader(buf.Bytes()))
	r.ContentLength = int64(buf.Len())
	r.Header.Del("Transfer-Encoding")
	return b, nil
}

func errBodyUnreadable(err error) *APIError {
	msg := "The request body could not be read."
	if errors.Is(err, io.ErrUnexpectedEOF) {
		msg = "The request body ended before its announced length."
	}
	return &APIError{Status: http.StatusBadRequest, Type: TypeInvalidRequest, Code: "invalid_body", Message: msg}
}
