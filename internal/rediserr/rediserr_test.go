package rediserr

import (
	"context"
	"errors"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/vigthoria/caddy-vigthoria/internal/redistest"
)

// TestRefused holds replies of a real Redis to what each means: a script
// error or a key of the wrong type is a refusal, a Redis that cannot
// answer now is waited out.
func TestRefused(t *testing.T) {
	s := redistest.Start(t)
	c := redis.NewClient(&redis.Options{Addr: s.Addr})
	t.Cleanup(func() { c.Close() })
	reply := func(msg string) error {
		return c.Eval(t.Context(), "return redis.error_reply(ARGV[1])", nil, msg).Err()
	}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{reply("ERR user_script:3: attempt to compare nil with number"), true},
		{reply("WRONGTYPE Operation against a key holding the wrong kind of value"), true},
		{reply("ERR max number of clients reached"), false},
		{reply("LOADING Redis is loading the dataset in memory"), false},
		{reply("BUSY Redis is busy running a script"), false},
		{reply("OOM command not allowed when used memory > 'maxmemory'"), false},
		{reply("READONLY You can't write against a read only replica"), false},
		{context.DeadlineExceeded, false},
		{errors.New("dial tcp 127.0.0.1:1: connect: connection refused"), false},
	} {
		if got := Refused(tc.err); got != tc.want {
			t.Errorf("Refused(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
