package standin

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"
)

// answerWords is the sentence every completion repeats, one word per token.
// The words need no JSON escaping, so they are appended verbatim.
var answerWords = [...]string{
	"This", "is", "the", "Vigthoria", "stand-in", "answering", "your",
	"request", "with", "a", "deterministic", "reply.",
}

// Answer returns the text of a completion of the given number of tokens: the
// concatenation of a stream's content deltas and the content of a whole answer.
func Answer(tokens int) string { return string(appendAnswer(nil, tokens)) }

func appendAnswer(b []byte, tokens int) []byte {
	for i := range tokens {
		b = appendToken(b, i)
	}
	return b
}

// appendToken appends token i. Tokens after the first carry their leading
// space, as OpenAI's do, so the deltas of a stream join into the answer.
func appendToken(b []byte, i int) []byte {
	if i > 0 {
		b = append(b, ' ')
	}
	return append(b, answerWords[i%len(answerWords)]...)
}

// answer is a planned completion, chat or legacy.
type answer struct {
	chat         bool
	stream       bool
	streamUsage  bool   // stream_options.include_usage
	id           []byte // "chatcmpl-…" or "cmpl-…"
	created      int64
	model        []byte // JSON-quoted
	choices      int    // returned
	generated    int    // generated and billed: choices, or more with best_of
	deltas       string // the kind of a stream's chat deltas: Behavior.Deltas
	tokens       int    // per choice
	finish       string // "stop" or "length"
	promptTokens int
	cachedTokens int    // of promptTokens: Behavior.CachedTokens
	usage        string // Behavior.Usage
}

// Markers for appendChunk's token argument.
const (
	roleChunk   = -1 // the opening chunk announcing the assistant role
	finishChunk = -2 // the closing chunk carrying finish_reason
)

// appendHead appends the fields every answer object starts with.
func (a *answer) appendHead(b []byte, object string) []byte {
	b = append(b, `{"id":"`...)
	b = append(b, a.id...)
	b = append(b, `","object":"`...)
	b = append(b, object...)
	b = append(b, `","created":`...)
	b = strconv.AppendInt(b, a.created, 10)
	b = append(b, `,"model":`...)
	b = append(b, a.model...)
	return append(b, ',')
}

// appendUsage appends the answer's usage; a chat answer's has the
// details objects OpenAI's has.
func (a *answer) appendUsage(b []byte) []byte {
	if a.usage != "" {
		return append(append(b, `"usage":`...), a.usage...)
	}
	completion := a.tokens * max(a.choices, a.generated)
	b = append(b, `"usage":{"prompt_tokens":`...)
	b = strconv.AppendInt(b, int64(a.promptTokens), 10)
	b = append(b, `,"completion_tokens":`...)
	b = strconv.AppendInt(b, int64(completion), 10)
	b = append(b, `,"total_tokens":`...)
	b = strconv.AppendInt(b, int64(a.promptTokens+completion), 10)
	if a.chat {
		reasoning := 0
		if a.deltas == ReasoningDeltas {
			reasoning = completion
		}
		b = append(b, `,"prompt_tokens_details":{"cached_tokens":`...)
		b = strconv.AppendInt(b, int64(a.cachedTokens), 10)
		b = append(b, `,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":`...)
		b = strconv.AppendInt(b, int64(reasoning), 10)
		b = append(b, `,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}`...)
	}
	return append(b, '}')
}

// appendWhole appends the non-streamed answer.
func (a *answer) appendWhole(b []byte) []byte {
	if a.chat {
		b = a.appendHead(b, "chat.completion")
	} else {
		b = a.appendHead(b, "text_completion")
	}
	b = append(b, `"choices":[`...)
	for i := range a.choices {
		if i > 0 {
			b = append(b, ',')
		}
		if a.chat {
			b = append(b, `{"index":`...)
			b = strconv.AppendInt(b, int64(i), 10)
			b = append(b, `,"message":{"role":"assistant","content":"`...)
			b = appendAnswer(b, a.tokens)
			b = append(b, `","refusal":null},"logprobs":null,"finish_reason":"`...)
		} else {
			b = append(b, `{"text":"`...)
			b = appendAnswer(b, a.tokens)
			b = append(b, `","index":`...)
			b = strconv.AppendInt(b, int64(i), 10)
			b = append(b, `,"logprobs":null,"finish_reason":"`...)
		}
		b = append(b, a.finish...)
		b = append(b, `"}`...)
	}
	b = append(b, "],"...)
	b = a.appendUsage(b)
	return append(b, '}')
}

// appendChunk appends one server-sent event for choice: token tok, or the
// roleChunk or finishChunk.
func (a *answer) appendChunk(b []byte, choice, tok int) []byte {
	b = append(b, "data: "...)
	if a.chat {
		b = a.appendHead(b, "chat.completion.chunk")
		b = append(b, `"choices":[{"index":`...)
		b = strconv.AppendInt(b, int64(choice), 10)
		b = append(b, `,"delta":{`...)
		switch {
		case tok == roleChunk && a.deltas == ToolCallDeltas:
			b = append(b, `"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_`...)
			b = append(b, a.id[len(a.id)-12:]...)
			b = append(b, `","type":"function","function":{"name":"answer","arguments":""}}]`...)
		case tok == roleChunk:
			b = append(b, `"role":"assistant","content":""`...)
		case tok >= 0 && a.deltas == ToolCallDeltas:
			b = append(b, `"tool_calls":[{"index":0,"function":{"arguments":"`...)
			b = appendToken(b, tok)
			b = append(b, `"}}]`...)
		case tok >= 0 && a.deltas == ReasoningDeltas:
			b = append(b, `"reasoning_content":"`...)
			b = appendToken(b, tok)
			b = append(b, '"')
		case tok >= 0:
			b = append(b, `"content":"`...)
			b = appendToken(b, tok)
			b = append(b, '"')
		}
		b = append(b, '}')
	} else {
		b = a.appendHead(b, "text_completion")
		b = append(b, `"choices":[{"text":"`...)
		if tok >= 0 {
			b = appendToken(b, tok)
		}
		b = append(b, `","index":`...)
		b = strconv.AppendInt(b, int64(choice), 10)
	}
	b = append(b, `,"logprobs":null,"finish_reason":`...)
	if tok == finishChunk {
		b = append(b, '"')
		if a.deltas == ToolCallDeltas {
			b = append(b, "tool_calls"...)
		} else {
			b = append(b, a.finish...)
		}
		b = append(b, '"')
	} else {
		b = append(b, "null"...)
	}
	b = append(b, "}]"...)
	if a.streamUsage {
		// OpenAI marks usage as still unknown on every chunk before the last.
		b = append(b, `,"usage":null`...)
	}
	return append(b, "}\n\n"...)
}

// stream sends the answer as server-sent events, pacing them by
// b.ChunkDelay and cutting the connection if b.FailMidStream says so.
func (s *Server) stream(w http.ResponseWriter, r *http.Request, a *answer, b *Behavior) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)

	e := events{w: w, rc: http.NewResponseController(w), done: r.Context().Done(), delay: b.ChunkDelay, buf: s.getBuf(), lineEnd: b.LineEnd}
	defer s.putBuf(e.buf)
	defer e.stop()

	if a.chat {
		for i := range a.choices {
			if !e.send(a.appendChunk(e.scratch(), i, roleChunk)) {
				return
			}
		}
	}
	if b.Think > 0 && !e.think(b.Think) {
		return
	}
	sent := 0
	for tok := range a.tokens {
		for i := range a.choices {
			ev := a.appendChunk(e.scratch(), i, tok)
			if tok == 0 && i == 0 && b.LongEvent > 0 {
				if !e.sendLong(ev, b.LongEvent, b.LongEventOpen) {
					return
				}
			} else if !e.send(ev) {
				return
			}
			s.written.Add(1)
			switch sent++; sent {
			case b.FailMidStream:
				// Aborting makes net/http drop the connection without ending
				// the response, as a crashing upstream would.
				panic(http.ErrAbortHandler)
			case b.StallMidBody:
				<-e.done
				return
			case b.ResetMidBody:
				reset(w)
				return
			}
		}
	}
	for i := range a.choices {
		if !e.send(a.appendChunk(e.scratch(), i, finishChunk)) {
			return
		}
	}
	if a.streamUsage {
		ev := append(e.scratch(), "data: "...)
		if a.chat {
			ev = a.appendHead(ev, "chat.completion.chunk")
		} else {
			ev = a.appendHead(ev, "text_completion")
		}
		ev = append(ev, `"choices":[],`...)
		ev = a.appendUsage(ev)
		if !e.send(append(ev, "}\n\n"...)) {
			return
		}
	}
	e.send(append(e.scratch(), "data: [DONE]\n\n"...))
}

// events writes server-sent events one at a time, flushed and paced.
type events struct {
	w     http.ResponseWriter
	rc    *http.ResponseController
	done  <-chan struct{} // closed when the client is gone
	delay time.Duration
	timer *time.Timer // reused between events
	sent  int
	buf   *[]byte // pooled; events are built in it one at a time
	// lineEnd ends the events' lines instead of "\n": Behavior.LineEnd.
	lineEnd string
}

// think waits d, silent, and reports false if the client left first.
func (e *events) think(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-e.done:
		return false
	}
}

// scratch returns the event buffer, emptied.
func (e *events) scratch() []byte { return (*e.buf)[:0] }

// send waits the delay (except before the first event), writes ev and
// flushes it. It reports false once the client is gone.
func (e *events) send(ev []byte) bool {
	if e.sent > 0 && e.delay > 0 {
		if e.timer == nil {
			e.timer = time.NewTimer(e.delay)
		} else {
			e.timer.Reset(e.delay)
		}
		select {
		case <-e.timer.C:
		case <-e.done:
			return false
		}
	}
	*e.buf = ev // keep the buffer as grown
	e.sent++
	if e.lineEnd != "" {
		ev = bytes.ReplaceAll(ev, []byte("\n"), []byte(e.lineEnd))
	}
	if _, err := e.w.Write(ev); err != nil {
		return false
	}
	return e.rc.Flush() == nil
}

// sendLong sends ev, a content chunk, with its output padded by size
// bytes from the shared buffer; open leaves out its blank line and holds
// the connection until the client leaves.
func (e *events) sendLong(ev []byte, size int, open bool) bool {
	*e.buf = ev
	i := bytes.Index(ev, []byte(`"content":"`)) + len(`"content":"`)
	if i < len(`"content":"`) {
		i = bytes.Index(ev, []byte(`"text":"`)) + len(`"text":"`)
	}
	end := len(ev) - 2 // the blank line
	if _, err := e.w.Write(ev[:i]); err != nil {
		return false
	}
	if writePadding(e.w, size) != nil {
		return false
	}
	if _, err := e.w.Write(ev[i:end]); err != nil {
		return false
	}
	if open {
		_ = e.rc.Flush()
		<-e.done
		return false
	}
	blank := "\n\n"
	if e.lineEnd != "" {
		blank = e.lineEnd + e.lineEnd
	}
	if _, err := io.WriteString(e.w, blank); err != nil {
		return false
	}
	e.sent++
	return e.rc.Flush() == nil
}

func (e *events) stop() {
	if e.timer != nil {
		e.timer.Stop()
	}
}

// breakWhole sends half of a whole answer, with the Content-Length of all
// of it, then stalls or resets as b says.
func breakWhole(w http.ResponseWriter, r *http.Request, body []byte, b *Behavior) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body[:len(body)/2])
	_ = http.NewResponseController(w).Flush()
	if b.StallMidBody > 0 {
		<-r.Context().Done()
		return
	}
	reset(w)
}

// writePadded sends body with a "padding" field of b.Padding bytes
// first, from the shared buffer; with b.StallMidBody it stops right after
// the padding, and holds the connection until the client leaves.
func writePadded(w http.ResponseWriter, r *http.Request, body []byte, b *Behavior) {
	const open = `{"padding":"`
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(open)+b.Padding+2+len(body)-1))
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, open)
	if writePadding(w, b.Padding) != nil {
		return
	}
	if b.StallMidBody > 0 {
		_ = http.NewResponseController(w).Flush()
		<-r.Context().Done()
		return
	}
	_, _ = io.WriteString(w, `",`)
	_, _ = w.Write(body[1:])
}

// reset flushes what was written and resets the connection (TCP RST), as
// a crashing upstream or a middlebox would.
func reset(w http.ResponseWriter) {
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	conn, _, err := rc.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0) // close with RST instead of FIN
	}
	conn.Close()
}
