package dashboard

import (
	"sync"
	"time"
)

// maxSamples bounds the live numbers kept: ten minutes at the page's
// pace of a sample every two seconds.
const maxSamples = 300

// minSampleGap is the least time between two samples: several pages
// polling at once share them.
const minSampleGap = time.Second

// sample is the proxy's counters at a time.
type sample struct {
	at time.Time
	Counters
}

// sampler keeps the last samples of the proxy's counters. It samples
// when asked, so that an idle dashboard costs nothing. Safe for
// concurrent use.
type sampler struct {
	read    func() Counters
	mu      sync.Mutex // protects samples
	samples []sample   // oldest first, at most maxSamples
}

func newSampler(read func() Counters) *sampler { return &sampler{read: read} }

// livePoint is one interval between two samples, as rates.
type livePoint struct {
	At       int64   `json:"t"` // unix seconds, the interval's end
	Requests float64 `json:"requests_per_s"`
	Refused  float64 `json:"refused_per_s"`
	Streams  int64   `json:"streams"`
	Queued   int64   `json:"queued"`
	// QueueWait is the mean wait of the requests admitted after waiting
	// in the interval, in seconds; 0 when none waited.
	QueueWait float64 `json:"queue_wait_s"`
}

// liveReport is the answer of api/live.
type liveReport struct {
	Points  []livePoint      `json:"points"`
	Refused map[string]int64 `json:"refused"` // since the process started, by reason
	Total   int64            `json:"requests"`
	Streams int64            `json:"streams"`
	Queued  int64            `json:"queued"`
}

// report samples the counters at now, unless sampled a moment ago, and
// returns the rates between the samples kept.
func (s *sampler) report(now time.Time) liveReport {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := len(s.samples); n == 0 || now.Sub(s.samples[n-1].at) >= minSampleGap {
		if n == maxSamples {
			s.samples = append(s.samples[:0], s.samples[1:]...)
		}
		s.samples = append(s.samples, sample{at: now, Counters: s.read()})
	}
	last := s.samples[len(s.samples)-1]
	rep := liveReport{Points: make([]livePoint, 0, len(s.samples)), Refused: last.Refused, Total: last.Requests, Streams: last.Streams, Queued: last.Queued}
	for i := 1; i < len(s.samples); i++ {
		a, b := s.samples[i-1], s.samples[i]
		secs := b.at.Sub(a.at).Seconds()
		p := livePoint{
			At:       b.at.Unix(),
			Requests: float64(max(b.Requests-a.Requests, 0)) / secs,
			Refused:  float64(max(sum(b.Refused)-sum(a.Refused), 0)) / secs,
			Streams:  b.Streams,
			Queued:   b.Queued,
		}
		if waited := b.QueueWaited - a.QueueWaited; waited > 0 {
			p.QueueWait = (b.QueueWait - a.QueueWait) / float64(waited)
		}
		rep.Points = append(rep.Points, p)
	}
	return rep
}

func sum(m map[string]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}
