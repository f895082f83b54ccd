package api

import "net/http"

// Endpoint is one operation of the API that the proxy lets through.
type Endpoint struct {
	ID     int    // index in Endpoints
	Name   string // short and label-safe, for logs and metrics
	Method string
	Path   string // path on the proxy, under /v1
	// Suffix is the path below the API's base: the upstream receives
	// <upstream base path> + Suffix.
	Suffix string
	// Body says the request carries a JSON body (POST endpoints).
	Body bool
}

// Endpoint IDs, indexes into Endpoints.
const (
	ChatCompletions = iota
	Completions
	Models
	Embeddings
	Usage
	NumEndpoints
)

// Endpoints are the only operations the proxy serves. Anything else is
// answered by the proxy and never reaches the upstream with the server key.
var Endpoints = [NumEndpoints]Endpoint{
	ChatCompletions: {ChatCompletions, "chat_completions", http.MethodPost, "/v1/chat/completions", "/chat/completions", true},
	Completions:     {Completions, "completions", http.MethodPost, "/v1/completions", "/completions", true},
	Models:          {Models, "models", http.MethodGet, "/v1/models", "/models", false},
	Embeddings:      {Embeddings, "embeddings", http.MethodPost, "/v1/embeddings", "/embeddings", true},
	Usage:           {Usage, "usage", http.MethodGet, "/v1/usage", "/usage", false},
}

// Route finds the endpoint for a request line. An unknown path is a 404 and
// a known path with another method a 405, both in the API's error shape.
func Route(method, path string) (*Endpoint, *Error) {
	var ep *Endpoint
	switch path {
	case "/v1/chat/completions":
		ep = &Endpoints[ChatCompletions]
	case "/v1/completions":
		ep = &Endpoints[Completions]
	case "/v1/models":
		ep = &Endpoints[Models]
	case "/v1/embeddings":
		ep = &Endpoints[Embeddings]
	case "/v1/usage":
		ep = &Endpoints[Usage]
	default:
		return nil, NotFound(method, path)
	}
	if method != ep.Method {
		return nil, MethodNotAllowed(method, path, ep.Method)
	}
	return ep, nil
}
