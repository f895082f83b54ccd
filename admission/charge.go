package admission

import (
	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
	"go.uber.org/zap"
)

// maxAnswerTokens bounds each count the upstream reports for a request
// (prompt, completion, cached and reasoning tokens) unless the request
// reserved more: 2^24, about 16.8 million, eight times the longest context
// window offered today (2 million), which no prompt or answer can pass.
// A prompt may well exceed its estimate (an image or a file costs far
// more than the bytes naming it), so the estimate is no bound; the window
// is. A request that reserves more, many choices of long answers, may
// use up to its reservation.
const maxAnswerTokens = 1 << 24

// Charge is what an answer costs:
//
//   - what the upstream reported, when it did, but output past the cap
//     the request was sent: that is charged only as far as the proxy saw
//     the answer carry it (its deltas counted for a stream, its bytes
//     for a whole answer, as no answer holds more output tokens than it
//     has bytes); pastCap is what was reported beyond. A stream's output
//     after its last usage object, which that object cannot count, is
//     charged on top, as counted from its deltas. A figure the usage
//     leaves out is no zero: it is taken from total_tokens and the other
//     figure when the usage gives both, else charged as if no usage came
//     (the prompt's estimate; the output streamed, or the whole
//     reservation's output for a whole answer);
//   - nothing when the upstream failed: an error status, or no answer
//     (connection refused, reset, idle_timeout) while the caller waited,
//     or a request that never reached the upstream;
//   - for a request whose caller left after it was sent, and whose usage
//     never came (its call was cut: no detached call was free, it passed
//     detached_timeout, or its config went away), the most the upstream
//     may bill for it: each byte of the body as a prompt token (no text
//     makes more tokens than it has bytes) and all the output it
//     reserved. A call that goes on detached reports its usage instead.
//     So for a request sent whose caller was answered early (504 at
//     header_timeout, its stream's end at idle_timeout): it goes on
//     detached, and is charged what the upstream reports, as below if the
//     upstream itself fails it, and the most it may bill if the proxy cut
//     it (see AnswerUsage.LeftUnread);
//   - for a stream without usage, cut short by the upstream while the
//     caller was there, the prompt's estimate and the output streamed
//     until then, as counted from its deltas: the upstream stopped
//     generating;
//   - for a whole answer without usage, the whole reservation;
//   - for usage that is absurd (garbled, or a count past the request's
//     bound, see maxAnswerTokens), the whole reservation too, and absurd
//     is true: such figures would only corrupt the ledger and the quota.
//
// bodyLen sizes the prompt's estimate when police set none.
func Charge(u *proxy.AnswerUsage, reserve, bodyLen int64) (used ledger.Tokens, absurd bool, pastCap int64) {
	prompt := u.Prompt
	if prompt == 0 {
		prompt = wire.PromptEstimate(bodyLen)
	}
	prompt = min(prompt, reserve)
	bound := max(reserve, maxAnswerTokens)
	switch {
	case u.Reported && u.Garbled == "" && max(u.PromptTokens, u.CompletionTokens, u.CachedTokens, u.ReasoningTokens) <= bound:
		used = ledger.Tokens{Prompt: u.PromptTokens, Completion: u.CompletionTokens, Cached: u.CachedTokens, Reasoning: u.ReasoningTokens}
		seen, after := u.Bytes, int64(0)
		if u.Stream {
			seen, after = u.Chunks, u.Chunks-u.ChunksAtUsage
		}
		switch {
		case u.HasPrompt:
		case u.HasTotal && u.HasCompletion:
			used.Prompt = max(u.TotalTokens-u.CompletionTokens, 0)
		default:
			used.Prompt = prompt
		}
		switch {
		case u.HasCompletion:
			used.Completion += after
		case u.HasTotal && u.HasPrompt:
			used.Completion = max(u.TotalTokens-u.PromptTokens, 0) + after
		case u.Stream:
			used.Completion = u.Chunks
		default:
			used.Completion = reserve - prompt
		}
		if ceiling := max(reserve-prompt, seen); used.Completion > ceiling {
			pastCap = used.Completion - ceiling
			used.Completion = ceiling
			used.Reasoning = min(used.Reasoning, ceiling)
		}
		return used, false, pastCap
	case u.Reported:
		absurd = true
	case u.Status >= 400:
		return ledger.Tokens{}, false, 0
	case !u.Sent() || !u.LeftUnread():
		if u.Status == 0 {
			return ledger.Tokens{}, false, 0
		}
		if u.Stream {
			return ledger.Tokens{Prompt: prompt, Completion: u.Chunks}, false, 0
		}
	default:
		return ledger.Tokens{Prompt: max(prompt, bodyLen), Completion: reserve - prompt}, false, 0
	}
	return ledger.Tokens{Prompt: prompt, Completion: reserve - prompt}, absurd, 0
}

// ChargeFor is Charge for a request of the client, with its cost at the
// model's price when it has one, logging usage it does not believe for the
// operator: a warning naming the caller by key ID. pastCap is the output
// reported past the cap and not charged.
func (ad *Admitter) ChargeFor(clientID, model string, u *proxy.AnswerUsage, reserve, bodyLen int64) (used ledger.Tokens, pastCap int64) {
	used, absurd, pastCap := Charge(u, reserve, bodyLen)
	if p, ok := ad.Policy.Price(model); ok {
		used.Cost = p.Cost(used.Prompt, used.Completion)
	}
	if pastCap > 0 {
		ad.Logger.Warn("the upstream reported more output than the cap it was sent and the answer carried: the rest is not charged",
			zap.String("client_id", clientID), zap.String("model", model),
			zap.Int64("completion_tokens", u.CompletionTokens), zap.Int64("charged_completion_tokens", used.Completion),
			zap.Int64("reserved", reserve))
	}
	if absurd {
		ad.Logger.Warn("the upstream reported absurd usage: charged the reservation instead",
			zap.String("client_id", clientID), zap.String("model", model),
			zap.Int64("prompt_tokens", u.PromptTokens), zap.Int64("completion_tokens", u.CompletionTokens),
			zap.Int64("cached_tokens", u.CachedTokens), zap.Int64("reasoning_tokens", u.ReasoningTokens),
			zap.String("garbled_usage", u.Garbled), zap.Int64("reserved", reserve))
	}
	return used, pastCap
}
