package vigthoria

import (
	"bytes"
	"io"
	"net/http"
	"strconv"

	"github.com/vigthoria/caddy-vigthoria/limiter"
	"github.com/vigthoria/caddy-vigthoria/proxy"
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

// refusal is the 429 for a request a limit refused.
func refusal(d limiter.Decision, tier string) *proxy.APIError {
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
		e.Message = "You exceeded your tier's token quota (" + tier + "). It renews at the start of the next period; see GET /v1/usage."
	case limiter.TooLarge:
		e.Type, e.Code = "tokens", "request_too_large"
		e.Message = "This request asks more tokens than tier " + tier + " allows per window: lower max_tokens or shorten the prompt."
	}
	return e
}

// police applies the tier's policy to a request body before anything is
// admitted or forwarded: the model allowlist and the max_tokens cap. It
// asks a stream for its usage. The upstream gets the client's bytes except
// for the fields changed here. It returns what admission reserves.
func (h *Handler) police(r *http.Request, ep *proxy.Endpoint, tier *Tier, body []byte, call *proxy.Call) (proxy.RequestInfo, int64, *proxy.APIError) {
	call.Body = body
	info, apiErr := proxy.ParseRequest(body)
	if apiErr != nil {
		return info, 0, apiErr
	}
	if info.Model == "" {
		return info, 0, errMissingModel
	}
	if !tier.allows(info.Model) {
		return info, 0, errModelNotAllowed(info.Model)
	}
	if ep.ID == proxy.Embeddings {
		return info, info.Estimate(len(body), 0), nil
	}
	call.StripUsage = info.Stream && !info.IncludeUsage
	out := body
	maxTokens := info.MaxTokens
	var err error
	switch {
	case tier.MaxTokens > 0 && maxTokens > tier.MaxTokens:
		return info, 0, errMaxTokens(tier.MaxTokens)
	case tier.MaxTokens > 0 && maxTokens == 0:
		maxTokens = tier.MaxTokens
		out, err = proxy.SetMaxTokens(out, info, maxTokens)
	case maxTokens == 0:
		maxTokens = DefaultMaxTokens
	}
	if err == nil && info.Stream {
		out, err = proxy.WithStreamUsage(out, info)
	}
	if err != nil {
		return info, 0, &proxy.APIError{Status: http.StatusBadRequest, Type: proxy.TypeInvalidRequest, Code: "invalid_request", Message: "The request body could not be read as JSON."}
	}
	if len(out) != len(body) || &out[0] != &body[0] {
		r.Body = io.NopCloser(bytes.NewReader(out))
		r.ContentLength = int64(len(out))
		call.Body = out
	}
	return info, info.Estimate(len(body), maxTokens), nil
}

// charge is what an answer costs, as prompt and completion tokens: what
// the upstream reported; else, for a stream cut short, the prompt's
// estimate and a token per streamed chunk; nothing when the upstream
// failed before answering; else the reservation.
func charge(u *proxy.AnswerUsage, reserve, bodyLen int64) (prompt, completion int64) {
	switch {
	case u.Reported:
		return u.PromptTokens, u.CompletionTokens
	case u.Status == 0 || u.Status >= 400:
		return 0, 0
	case u.Chunks > 0:
		return proxy.PromptEstimate(bodyLen), u.Chunks
	}
	return reserve, 0
}
