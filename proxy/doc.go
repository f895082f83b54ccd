// Package proxy is the upstream side of the handler: Caddy's own
// reverse_proxy with the server key injected and the caller's headers
// allowlisted, retries, calls that go on after their caller left
// (detached), the upstream's word on spent keys and models, the models
// cache, body shares, and the taps that read an answer's usage as it
// passes. It answers the upstream's failures in the API's shape.
//
// It may import api, proxy/wire and Caddy's reverseproxy.
package proxy
