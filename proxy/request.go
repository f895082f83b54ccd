package proxy

import (
	"net/http"

	"github.com/vigthoria/caddy-vigthoria/api"
	"github.com/vigthoria/caddy-vigthoria/proxy/wire"
)

// ParseRequest reads the fields the proxy polices from a request body
// (wire.ParseRequest), refusing a body it cannot take with 400
// invalid_request.
func ParseRequest(body []byte) (wire.RequestInfo, *api.Error) {
	info, err := wire.ParseRequest(body)
	if err != nil {
		return info, &api.Error{Status: http.StatusBadRequest, Type: api.TypeInvalidRequest, Code: "invalid_request", Message: err.Error()}
	}
	return info, nil
}
