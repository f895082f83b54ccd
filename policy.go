package vigthoria

import (
	"bytes"
	"cmp"
	"io"
	"math"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/ledger"
	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// errUnavailable answers when the proxy cannot decide for lack of its
// store, and its policy is to refuse rather than guess.
var errUnavailable = &proxy.APIError{
	Status:  http.StatusServiceUnavailable,
	Type:    proxy.TypeAPI,
	Code:    "proxy_unavailable",
	Message: "The proxy cannot check your limits right now. Please try again shortly.",
}

var errMissingModel = &proxy.APIError{
	Status:  http.StatusBadRequest,
	Type:    proxy.TypeInvalidRequest,
	Code:    "missing_model",
	Message: "The request names no model: set \"model\".",
}

var errModelName = &proxy.APIError{
	Status:  http.StatusBadRequest,
	Type:    proxy.TypeInvalidRequest,
	Code:    "invalid_model",
	Message: "The model name is longer than " + strconv.Itoa(policy.MaxModelName) + " bytes or holds control characters.",
}

func errModelNotAllowed(model string) *proxy.APIError {
	if len(model) > 100 {
		model = model[:100] + "…"
	}
	return &proxy.APIError{
		Status:  http.StatusForbidden,
		Type:    proxy.TypeInvalidRequest,
		Code:    "model_not_allowed",
		Message: "The model " + strconv.Quote(model) + " is not available to your tier.",
	}
}

func errMaxTokens(limit int64) *proxy.APIError {
	return &proxy.APIError{
		Status:  http.StatusBadRequest,
		Type:    proxy.TypeInvalidRequest,
		Code:    "max_tokens_too_large",
		Message: "max_tokens is larger than your tier allows: at most " + strconv.FormatInt(limit, 10) + ".",
	}
}

// refusal is the 429 for a request a limit of lim refused.
func refusal(d limiter.Decision, lim *limiter.Limits, tier string) *proxy.APIError {
	e := &proxy.APIError{Status: http.StatusTooManyRequests, Code: "rate_limit_exceeded"}
	wait := " Please try again in " + strconv.Itoa(retrySeconds(d.RetryAfter)) + "s."
	switch d.Reason {
	case limiter.RequestLimit:
		e.Type = "requests"
		e.Message = "Rate limit reached for requests on tier " + tier + "." + wait
	case limiter.TokenLimit:
		e.Type = "tokens"
		e.Message = "Rate limit reached for tokens on tier " + tier + "." + wait
	case limiter.ConcurrencyLimit:
		e.Type = "requests"
		e.Message = "Too many requests in flight at once on tier " + tier + "." + wait
	case limiter.QuotaLimit:
		e.Type, e.Code = "insufficient_quota", "insufficient_quota"
		e.Message = "You exceeded your tier's token quota (" + tier + ")."
		if q := &lim.Quota; d.QuotaUsed < q.N {
			// Its reservation did not fit: a smaller one may.
			e.Message = "This request could use more tokens than are left of your tier's token quota (" + tier + ": " +
				strconv.FormatInt(q.N-d.QuotaUsed, 10) + " of " + strconv.FormatInt(q.N, 10) + " left); a smaller request may still fit."
		}
		e.Message += " It renews at the start of the next period; see GET /v1/usage."
	case limiter.TooLarge:
		e.Type, e.Code = "tokens", "request_too_large"
		e.Message = "This request asks more tokens than tier " + tier + " allows per window."
	}
	return e
}

// capBounds are what bound a request's output cap: the smallest
// max_tokens that applies to it, and the room its prompt leaves in the
// smallest of the token buckets it is reserved on.
type capBounds struct {
	limit int64 // the smallest max_tokens that applies; 0 for none
	room  int64 // tokens that bucket holds beyond the prompt; math.MaxInt64 without a bucket
	// spend is the output tokens the smallest quota or budget could pay
	// for beside the prompt, were none of it spent; math.MaxInt64
	// without either, negative when the prompt alone is past it.
	spend int64
	// The bucket that leaves the least room: its capacity and window, and
	// whether it is shared by the users of the key that minted a token.
	capacity int64
	window   time.Duration
	shared   bool
}

// bound narrows b by the max_tokens and the token bucket of one side of
// a request whose prompt is estimated at prompt tokens.
func (b *capBounds) bound(t *Tier, prompt int64, shared bool) {
	if t.MaxTokens > 0 && (b.limit == 0 || t.MaxTokens < b.limit) {
		b.limit = t.MaxTokens
	}
	if r := &t.limits.Tokens; !r.Unlimited() && r.Capacity()-prompt < b.room {
		b.room, b.capacity, b.window, b.shared = r.Capacity()-prompt, r.Capacity(), r.Window, shared
	}
}

// boundsOf are the cap bounds of a request of a caller of tier whose
// prompt is estimated at prompt tokens: its tier's (with its key's
// settings; for the user of a minted token, max_tokens already narrowed
// by its minting key's), and for such a user the token bucket, quota and
// budget of the key that minted it, which bound all its users.
func (h *Handler) boundsOf(tier *Tier, model string, prompt int64) capBounds {
	b := capBounds{room: math.MaxInt64, spend: math.MaxInt64}
	b.bound(tier, prompt, false)
	h.boundSpend(&b, tier, model, prompt)
	if m := tier.minter; m != nil {
		b.bound(m, prompt, true)
		h.boundSpend(&b, m, model, prompt)
	}
	return b
}

// boundSpend narrows b.spend by the quota and the budget of t, the
// budget at model's price.
func (h *Handler) boundSpend(b *capBounds, t *Tier, model string, prompt int64) {
	if q := &t.limits.Quota; !q.Unlimited() {
		b.spend = min(b.spend, q.N-prompt)
	}
	if q := &t.budget.Quota; !q.Unlimited() {
		if p, ok := h.price(model); ok {
			b.spend = min(b.spend, p.affordable(q.N, prompt))
		}
	}
}

// bucketName says which token bucket bounds describe, for a refusal.
func (b *capBounds) bucketName() string {
	s := "your tier's token limit"
	if b.shared {
		s = "the token limit shared by every user of the app that signed you in"
	}
	return s + " (" + strconv.FormatInt(b.capacity, 10) + " tokens per " + b.window.String() + ")"
}

// errPromptTooLarge refuses a request whose prompt alone leaves no room
// in a token bucket for its answers: no wait and no cap can admit it.
func errPromptTooLarge(b *capBounds, prompt, choices int64, generates bool) *proxy.APIError {
	msg := "This request's prompt, about " + strconv.FormatInt(prompt, 10) + " tokens, "
	switch {
	case b.room < 0 || !generates:
		msg += "is more than " + b.bucketName() + " holds: shorten the prompt."
	case choices > 1:
		msg += "leaves no room within " + b.bucketName() + " for its " + strconv.FormatInt(choices, 10) + " answers: shorten the prompt or ask fewer answers."
	default:
		msg += "leaves no room within " + b.bucketName() + " for an answer: shorten the prompt."
	}
	return &proxy.APIError{Status: http.StatusTooManyRequests, Type: "tokens", Code: proxy.CodeRequestTooLarge, Message: msg}
}

// errCapTooLarge refuses a request whose own cap, for each of its
// answers, does not fit a token bucket beside its prompt, saying the
// largest that would.
func errCapTooLarge(b *capBounds, field string, sent, prompt, choices int64) *proxy.APIError {
	msg := field + " " + strconv.FormatInt(sent, 10)
	if choices > 1 {
		msg += " for each of this request's " + strconv.FormatInt(choices, 10) + " answers"
	}
	msg += ", with its prompt of about " + strconv.FormatInt(prompt, 10) + " tokens, is more than " + b.bucketName() +
		" holds: ask at most " + strconv.FormatInt(b.room/choices, 10)
	if choices > 1 {
		msg += " for each"
	}
	return &proxy.APIError{Status: http.StatusTooManyRequests, Type: "tokens", Code: proxy.CodeRequestTooLarge, Message: msg + "."}
}

// police applies the tier's policy to a request body before anything is
// admitted or forwarded: the model allowlist and the output cap (for a
// minted token's user, both narrowed by its key's: see mintedTier), which
// holds for each answer the request asks (choice). Every request that generates leaves with a cap
// in a field its endpoint reads: its own, or the one given here, the
// smallest max_tokens that applies (else default_max_tokens), shrunk to
// what the token buckets hold beside the prompt, so that the upstream
// never writes more than was reserved. It asks a stream for its usage.
// The upstream gets the client's bytes except for the fields changed
// here. It returns what admission reserves: the prompt's estimate and
// every choice at its longest, n (or best_of) for each prompt.
func (h *Handler) police(r *http.Request, ep *proxy.Endpoint, tier *Tier, body []byte, call *proxy.Call) (wire.RequestInfo, int64, *proxy.APIError) {
	call.Body = body
	info, apiErr := proxy.ParseRequest(body)
	if apiErr != nil {
		return info, 0, apiErr
	}
	if info.Model == "" {
		return info, 0, errMissingModel
	}
	if !policy.ValidModelName(info.Model) {
		return info, 0, errModelName
	}
	if !tier.allows(info.Model) {
		return info, 0, errModelNotAllowed(info.Model)
	}
	call.Usage.Prompt = info.PromptTokens
	call.Usage.Watch(r.Context())
	if ep.ID == proxy.ChatCompletions {
		// Chat has no prompts nor best_of: fields of those names in its
		// body are not the upstream's, and multiply nothing.
		info.Choices = info.N
	}
	generates := ep.ID != proxy.Embeddings
	choices := max(info.Choices, 1)
	b := h.boundsOf(tier, info.Model, info.PromptTokens)
	if b.room < 0 || generates && b.room < choices {
		return info, 0, errPromptTooLarge(&b, info.PromptTokens, choices, generates)
	}
	if !generates {
		return info, info.Estimate(0), nil
	}
	call.StripUsage = info.Stream && !info.IncludeUsage
	call.Usage.Stream = info.Stream
	out := body
	maxTokens := info.MaxTokens
	var err error
	switch {
	case b.limit > 0 && maxTokens > b.limit:
		return info, 0, errMaxTokens(b.limit)
	case maxTokens*choices > b.room:
		return info, 0, errCapTooLarge(&b, info.CapField(), maxTokens, info.PromptTokens, choices)
	case maxTokens == 0:
		maxTokens = min(cmp.Or(b.limit, h.DefaultMaxTokens, DefaultMaxTokens), b.room/choices)
		if fit := b.spend / choices; fit >= 1 {
			// A quota or budget smaller than the cap would refuse every
			// request without one; what it leaves is the limiter's to
			// judge (its refusal says a smaller request may fit).
			maxTokens = min(maxTokens, fit)
		}
		out, err = wire.SetCap(out, info, h.injectedCapField(ep, &info), maxTokens)
	case ep.ID == proxy.Completions && !info.SetsMaxTokens():
		// Its cap is in max_completion_tokens, which completions do not
		// read: the field they read gets it.
		out, err = wire.SetCap(out, info, wire.MaxTokensField, maxTokens)
	}
	if err == nil && info.Stream {
		out, err = wire.WithStreamUsage(out, info)
	}
	if err != nil {
		return info, 0, &proxy.APIError{Status: http.StatusBadRequest, Type: proxy.TypeInvalidRequest, Code: "invalid_request", Message: "The request body could not be read as JSON."}
	}
	if len(out) != len(body) || &out[0] != &body[0] {
		r.Body = io.NopCloser(bytes.NewReader(out))
		r.ContentLength = int64(len(out))
		call.Body = out
	}
	return info, info.Estimate(maxTokens), nil
}

// injectedCapField is the field a request without a cap gets one in:
// max_tokens for completions; for chat, a cap field the body names as
// null, else cap_field.
func (h *Handler) injectedCapField(ep *proxy.Endpoint, info *wire.RequestInfo) string {
	if ep.ID != proxy.ChatCompletions {
		return wire.MaxTokensField
	}
	return cmp.Or(info.NamedCapField(), h.CapField, wire.MaxCompletionTokensField)
}

// maxAnswerTokens bounds each count the upstream reports for a request
// (prompt, completion, cached and reasoning tokens) unless the request
// reserved more: 2^24, about 16.8 million, eight times the longest context
// window offered today (2 million), which no prompt or answer can pass.
// A prompt may well exceed its estimate (an image or a file costs far
// more than the bytes naming it), so the estimate is no bound; the window
// is. A request that reserves more, many choices of long answers, may
// use up to its reservation.
const maxAnswerTokens = 1 << 24

// charge is what an answer costs:
//
//   - what the upstream reported, when it did, but output past the cap
//     the request was sent: that is charged only as far as the proxy saw
//     the answer carry it (its deltas counted for a stream, its bytes
//     for a whole answer, as no answer holds more output tokens than it
//     has bytes); pastCap is what was reported beyond;
//   - nothing when the upstream failed: an error status, or no answer
//     (connection refused, timeout, reset) while the caller waited, or a
//     request that never reached the upstream;
//   - for a request whose caller left after it was sent, and whose usage
//     never came (its call was cut: no detached call was free, it passed
//     detached_timeout, or its config went away), the most the upstream
//     may bill for it: each byte of the body as a prompt token (no text
//     makes more tokens than it has bytes) and all the output it
//     reserved. A call that goes on detached reports its usage instead;
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
func charge(u *proxy.AnswerUsage, reserve, bodyLen int64) (used ledger.Tokens, absurd bool, pastCap int64) {
	prompt := u.Prompt
	if prompt == 0 {
		prompt = wire.PromptEstimate(bodyLen)
	}
	prompt = min(prompt, reserve)
	bound := max(reserve, maxAnswerTokens)
	switch {
	case u.Reported && u.Garbled == "" && max(u.PromptTokens, u.CompletionTokens, u.CachedTokens, u.ReasoningTokens) <= bound:
		used = ledger.Tokens{Prompt: u.PromptTokens, Completion: u.CompletionTokens, Cached: u.CachedTokens, Reasoning: u.ReasoningTokens}
		seen := u.Bytes
		if u.Stream {
			seen = u.Chunks
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
	case !u.Sent() || !u.CallerLeft():
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

// chargeFor is charge for a request of the client, with its cost at the
// model's price when it has one, logging usage it does not believe for the
// operator: a warning naming the caller by key ID.
func (h *Handler) chargeFor(clientID, tier, model string, u *proxy.AnswerUsage, reserve, bodyLen int64) ledger.Tokens {
	used, absurd, pastCap := charge(u, reserve, bodyLen)
	if p, ok := h.price(model); ok {
		used.Cost = p.cost(used.Prompt, used.Completion)
	}
	if pastCap > 0 {
		pastCapBy.get(tier).Inc()
		h.logger.Warn("the upstream reported more output than the cap it was sent and the answer carried: the rest is not charged",
			zap.String("client_id", clientID), zap.String("model", model),
			zap.Int64("completion_tokens", u.CompletionTokens), zap.Int64("charged_completion_tokens", used.Completion),
			zap.Int64("reserved", reserve))
	}
	if absurd {
		h.logger.Warn("the upstream reported absurd usage: charged the reservation instead",
			zap.String("client_id", clientID), zap.String("model", model),
			zap.Int64("prompt_tokens", u.PromptTokens), zap.Int64("completion_tokens", u.CompletionTokens),
			zap.Int64("cached_tokens", u.CachedTokens), zap.Int64("reasoning_tokens", u.ReasoningTokens),
			zap.String("garbled_usage", u.Garbled), zap.Int64("reserved", reserve))
	}
	return used
}
