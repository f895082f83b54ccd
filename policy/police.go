package policy

import (
	"bytes"
	"cmp"
	"io"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/proxy"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

var errMissingModel = &api.Error{
	Status:  http.StatusBadRequest,
	Type:    api.TypeInvalidRequest,
	Code:    "missing_model",
	Message: "The request names no model: set \"model\".",
}

var errModelName = &api.Error{
	Status:  http.StatusBadRequest,
	Type:    api.TypeInvalidRequest,
	Code:    "invalid_model",
	Message: "The model name is longer than " + strconv.Itoa(MaxModelName) + " bytes or holds control characters.",
}

// errModelNotAllowed refuses a model that what refuses does not allow:
// "your tier", "your token" or "the app that signed you in".
func errModelNotAllowed(model, what string) *api.Error {
	return &api.Error{
		Status:  http.StatusForbidden,
		Type:    api.TypeInvalidRequest,
		Code:    "model_not_allowed",
		Message: "The model " + strconv.Quote(api.Clip(model, 100)) + " is not available to " + what + ".",
	}
}

func errMaxTokens(limit int64) *api.Error {
	return &api.Error{
		Status:  http.StatusBadRequest,
		Type:    api.TypeInvalidRequest,
		Code:    "max_tokens_too_large",
		Message: "max_tokens is larger than your tier allows: at most " + strconv.FormatInt(limit, 10) + ".",
	}
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
func (h *Policy) boundsOf(tier *Tier, model string, prompt int64) capBounds {
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
func (h *Policy) boundSpend(b *capBounds, t *Tier, model string, prompt int64) {
	if q := &t.limits.Quota; !q.Unlimited() {
		b.spend = min(b.spend, q.N-prompt)
	}
	if q := &t.budget.Quota; !q.Unlimited() {
		if p, ok := h.Price(model); ok {
			b.spend = min(b.spend, p.Affordable(q.N, prompt))
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
func errPromptTooLarge(b *capBounds, prompt, choices int64, generates bool) *api.Error {
	msg := "This request's prompt, about " + strconv.FormatInt(prompt, 10) + " tokens, "
	switch {
	case b.room < 0 || !generates:
		msg += "is more than " + b.bucketName() + " holds: shorten the prompt."
	case choices > 1:
		msg += "leaves no room within " + b.bucketName() + " for its " + strconv.FormatInt(choices, 10) + " answers: shorten the prompt or ask fewer answers."
	default:
		msg += "leaves no room within " + b.bucketName() + " for an answer: shorten the prompt."
	}
	return &api.Error{Status: http.StatusTooManyRequests, Type: "tokens", Code: api.CodeRequestTooLarge, Message: msg}
}

// errCapTooLarge refuses a request whose own cap, for each of its
// answers, does not fit a token bucket beside its prompt, saying the
// largest that would.
func errCapTooLarge(b *capBounds, field string, sent, prompt, choices int64) *api.Error {
	msg := field + " " + strconv.FormatInt(sent, 10)
	if choices > 1 {
		msg += " for each of this request's " + strconv.FormatInt(choices, 10) + " answers"
	}
	msg += ", with its prompt of about " + strconv.FormatInt(prompt, 10) + " tokens, is more than " + b.bucketName() +
		" holds: ask at most " + strconv.FormatInt(b.room/choices, 10)
	if choices > 1 {
		msg += " for each"
	}
	return &api.Error{Status: http.StatusTooManyRequests, Type: "tokens", Code: api.CodeRequestTooLarge, Message: msg + "."}
}

// Police applies the tier's policy to a request body before anything is
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
func (h *Policy) Police(r *http.Request, ep *api.Endpoint, tier *Tier, body []byte, call *proxy.Call) (wire.RequestInfo, int64, *api.Error) {
	call.Body = body
	info, apiErr := proxy.ParseRequest(body)
	if apiErr != nil {
		return info, 0, apiErr
	}
	if info.Model == "" {
		return info, 0, errMissingModel
	}
	if !ValidModelName(info.Model) {
		return info, 0, errModelName
	}
	if !tier.Allows(info.Model) {
		return info, 0, errModelNotAllowed(info.Model, tier.refuser(info.Model))
	}
	call.Usage.Prompt = info.PromptTokens
	call.Usage.Watch(r.Context())
	if ep.ID == api.ChatCompletions {
		// Chat has no prompts nor best_of: fields of those names in its
		// body are not the upstream's, and multiply nothing.
		info.Choices = info.N
	}
	generates := ep.ID != api.Embeddings
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
		maxTokens = min(cmp.Or(b.limit, h.cfg.DefaultMaxTokens, DefaultMaxTokens), b.room/choices)
		if fit := b.spend / choices; fit >= 1 {
			// A quota or budget smaller than the cap would refuse every
			// request without one; what it leaves is the limiter's to
			// judge (its refusal says a smaller request may fit).
			maxTokens = min(maxTokens, fit)
		}
		out, err = wire.SetCap(out, info, h.injectedCapField(ep, &info), maxTokens)
	case !info.SetsMaxTokens() && (ep.ID == api.Completions || h.cfg.CapField == wire.MaxTokensField):
		// Its cap is in max_completion_tokens, which completions do not
		// read, nor chat on an upstream of cap_field max_tokens: the
		// field they read gets it.
		out, err = wire.SetCap(out, info, wire.MaxTokensField, maxTokens)
	}
	if err == nil && info.Stream {
		out, err = wire.WithStreamUsage(out, info)
	}
	if err != nil {
		return info, 0, &api.Error{Status: http.StatusBadRequest, Type: api.TypeInvalidRequest, Code: "invalid_request", Message: "The request body could not be read as JSON."}
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
func (h *Policy) injectedCapField(ep *api.Endpoint, info *wire.RequestInfo) string {
	if ep.ID != api.ChatCompletions {
		return wire.MaxTokensField
	}
	return cmp.Or(info.NamedCapField(), h.cfg.CapField, wire.MaxCompletionTokensField)
}
