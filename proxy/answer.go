package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// maxCheckedAnswer bounds the JSON answer that is read whole, and checked,
// before its status goes to the client. Completions are far smaller; a
// larger answer (a big batch of embeddings) passes as it comes.
const maxCheckedAnswer = 1 << 20

// errBadAnswer is a 2xx answer labelled JSON that is not JSON: the client
// gets a 502 instead of a success it cannot read.
var errBadAnswer = errors.New("upstream answer is not valid JSON")

// idleError is the upstream staying silent longer than the idle timeout
// after its headers. It is a net.Error that times out, which is how Caddy's
// reverse proxy tells a 504 from a 502.
type idleError struct{}

func (idleError) Error() string   { return "the upstream sent nothing for longer than idle_timeout" }
func (idleError) Timeout() bool   { return true }
func (idleError) Temporary() bool { return true }

var errIdle error = idleError{}

var answerPool = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// maxPooledAnswer keeps the pool's buffers to the size of common answers;
// one grown for a larger answer is left to the collector.
const maxPooledAnswer = 64 << 10

// checkedAnswer is a JSON answer read whole: it is known to be complete
// and well-formed before the client sees its status.
type checkedAnswer struct {
	bufp *[]byte
	rest []byte
	held int64 // bytes counted in the process's answers (wire.Hold)
}

// readAnswer reads a 2xx JSON answer whole, up to maxCheckedAnswer, into
// into, and returns it. A body that breaks off, or is not JSON, is an
// error, so the client gets a clean 502/504 instead of a truncated 200.
// A longer body is returned unchecked, the part already read first, and
// so is one for which the answers of the process have no more room
// (limit, see wire.Hold): it passes as it comes, its usage read from its
// end, rather than wait for memory.
func readAnswer(res *http.Response, u *AnswerUsage, into *checkedAnswer, limit int64) (io.ReadCloser, error) {
	bufp := answerPool.Get().(*[]byte)
	buf := (*bufp)[:0]
	held := int64(cap(buf))
	wire.Take(held)
	room := true
	// A byte more than announced, to read the end without growing.
	if n := res.ContentLength + 1; n > int64(cap(buf)) && n <= maxCheckedAnswer+1 {
		if room = wire.Hold(n-held, limit); room {
			buf, held = make([]byte, 0, n), n
		}
	}
	for room && len(buf) <= maxCheckedAnswer {
		if len(buf) == cap(buf) {
			size := min(2*cap(buf), maxCheckedAnswer+1)
			if room = wire.Hold(int64(size)-held, limit); !room {
				break
			}
			grown := make([]byte, len(buf), size)
			copy(grown, buf)
			buf, held = grown, int64(size)
		}
		n, err := res.Body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			*bufp = buf
			putAnswer(bufp, held)
			res.Body.Close()
			return nil, err
		}
	}
	*bufp = buf
	if !room || len(buf) > maxCheckedAnswer {
		// Passed on as it comes; the part read is held until then, and
		// its buffer is not returned to the pool.
		return &jsonTap{src: prefixed{io.MultiReader(bytes.NewReader(buf), res.Body), res.Body}, usage: u, held: held}, nil
	}
	u.Bytes = int64(len(buf))
	res.Body.Close()
	if !wire.ValidJSON(buf) {
		putAnswer(bufp, held)
		return nil, errBadAnswer
	}
	parseUsage(buf[max(len(buf)-jsonTailSize, 0):], u)
	// Whole, before the caller has a byte of it: a caller who hangs up
	// once it has it did not leave early.
	u.noteEnd()
	res.ContentLength = int64(len(buf))
	*into = checkedAnswer{bufp: bufp, rest: buf, held: held}
	return into, nil
}

func (a *checkedAnswer) Read(p []byte) (int, error) {
	if len(a.rest) == 0 {
		return 0, io.EOF
	}
	n := copy(p, a.rest)
	a.rest = a.rest[n:]
	return n, nil
}

// WriteTo hands the answer over in one write.
func (a *checkedAnswer) WriteTo(w io.Writer) (int64, error) {
	n, err := w.Write(a.rest)
	a.rest = a.rest[n:]
	return int64(n), err
}

func (a *checkedAnswer) Close() error {
	if a.bufp != nil {
		putAnswer(a.bufp, a.held)
		a.bufp, a.rest, a.held = nil, nil, 0
	}
	return nil
}

// putAnswer gives an answer's buffer back, with the held bytes it was
// counted for: to the pool if it is of a common size.
func putAnswer(bufp *[]byte, held int64) {
	wire.Release(held)
	if cap(*bufp) <= maxPooledAnswer {
		*bufp = (*bufp)[:0]
		answerPool.Put(bufp)
	}
}

// prefixed reads a body whose start was read already and closes both.
type prefixed struct {
	io.Reader
	src io.Closer
}

func (p prefixed) Close() error { return p.src.Close() }

// idleBody cuts an upstream body that stays silent longer than timeout,
// by cancelling its request. Only the time spent waiting in Read counts: a
// client that reads slowly holds the proxy back from reading, and that is
// not the upstream's silence.
type idleBody struct {
	src     io.ReadCloser
	cancel  context.CancelCauseFunc
	timer   *time.Timer
	timeout time.Duration
	idled   atomic.Bool // the timer cut the request: a read's error is errIdle
}

func newIdleBody(src io.ReadCloser, cancel context.CancelCauseFunc, timeout time.Duration) *idleBody {
	b := &idleBody{src: src, cancel: cancel, timeout: timeout}
	b.timer = time.AfterFunc(timeout, func() { b.idled.Store(true); cancel(errIdle) })
	b.timer.Stop() // armed by each Read
	return b
}

func (b *idleBody) Read(p []byte) (int, error) {
	b.timer.Reset(b.timeout)
	n, err := b.src.Read(p)
	b.timer.Stop()
	if err != nil && err != io.EOF && b.idled.Load() {
		err = errIdle
	}
	return n, err
}

func (b *idleBody) Close() error {
	b.timer.Stop()
	err := b.src.Close()
	b.cancel(nil)
	return err
}
