package proxy

import (
	"net/http"

	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// ParseRequest reads the fields the proxy polices from a request body
// (wire.ParseRequest), refusing a body it cannot take with 400
// invalid_request.
func ParseRequest(body []byte) (wire.RequestInfo, *APIError) {
	info, err := wire.ParseRequest(body)
	if err != nil {
		return info, &APIError{Status: http.StatusBadRequest, Type: TypeInvalidRequest, Code: "invalid_request", Message: err.Error()}
	}
	return info, nil
}
