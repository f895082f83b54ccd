// Package wire reads and edits the API's bytes without decoding them: a
// request body's policed fields and its edits (the output cap, stream
// usage), the JSON validator, usage objects, and SSE framing in whole
// events. It imports the standard library only, so that its fuzz
// targets build in seconds.
package wire
