package vigthoria

// The key store backends: each registers itself with store.Register in
// its init, as Caddy modules do, and this is the only place that names
// them.
import (
	_ "github.com/vigthoria/caddy-vigthoria/store/redis"
	_ "github.com/vigthoria/caddy-vigthoria/store/sqlite"
)
