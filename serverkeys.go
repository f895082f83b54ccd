package vigthoria

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/policy"
	"github.com/vigthoria/caddy-vigthoria/proxy"
)

// APIKeys is a pool of server keys: each request goes to the key with
// the most room for its model, by weight, and a key the upstream refuses
// (401/403) is out of the pool until a probe passes. See
// docs/upstream.md.
type APIKeys struct {
	// The keys of the pool. Each one's key is a placeholder such as
	// {env.VIGTHORIA_KEY_1}, resolved at run time (a literal warns, as
	// api_key does); two keys resolving alike are an error.
	Keys []ServerKeyConfig `json:"keys,omitempty"`

	// How often a key the upstream refused is probed with GET
	// <upstream>/models; a 2xx answer returns it to the pool. In a fleet
	// one instance probes a key at a time. Default: 30s.
	ProbeEvery caddy.Duration `json:"probe_every,omitempty"`
}

// ServerKeyConfig is one key of api_keys.
type ServerKeyConfig struct {
	// The server key, a placeholder such as {env.VIGTHORIA_KEY_1}.
	// Required.
	Key string `json:"key"`

	// A short label for the key in metrics, logs and events: lower-case
	// letters, digits, '_' and '-', at most 32, unique in the pool.
	// Default: the key's fingerprint (a truncated SHA-256 of the upstream
	// URL and the key, from which the key cannot be recovered).
	Name string `json:"name,omitempty"`

	// The key's share of the requests, against the other keys' weights,
	// while the upstream's rate-limit headers say nothing of its room.
	// Default: 1.
	Weight int `json:"weight,omitempty"`

	// Globs of the models the key serves (as a tier's models). A request
	// for a model no key serves gets 404 model_not_available. Default:
	// every model.
	Models []string `json:"models,omitempty"`
}

// maxKeyName bounds a server key's name: it is a metric label.
const maxKeyName = 32

// checkKeyName refuses a key name that is not a short label.
func checkKeyName(name string) error {
	if len(name) == 0 || len(name) > maxKeyName {
		return fmt.Errorf("key name '%s' must be 1 to %d characters", name, maxKeyName)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return fmt.Errorf("key name '%s' may hold only a-z, 0-9, '_' and '-'", name)
		}
	}
	return nil
}

// validateAPIKeys checks the pool's configuration without resolving a key.
func (h *Handler) validateAPIKeys() error {
	if h.APIKeys == nil {
		return nil
	}
	if h.APIKeys.ProbeEvery < 0 {
		return fmt.Errorf("api_keys: probe_every must be positive, not %s", time.Duration(h.APIKeys.ProbeEvery))
	}
	names := make(map[string]bool, len(h.APIKeys.Keys))
	for i, k := range h.APIKeys.Keys {
		if k.Key == "" {
			return fmt.Errorf("api_keys: key %d is empty", i+1)
		}
		if k.Name != "" {
			if err := checkKeyName(k.Name); err != nil {
				return fmt.Errorf("api_keys: %w", err)
			}
			if names[k.Name] {
				return fmt.Errorf("api_keys: key name '%s' given twice", k.Name)
			}
			names[k.Name] = true
		}
		if k.Weight < 0 {
			return fmt.Errorf("api_keys: key %d: weight must be positive, not %d", i+1, k.Weight)
		}
		for _, g := range k.Models {
			if err := policy.CheckGlob(g); err != nil {
				return fmt.Errorf("api_keys: key %d: %w", i+1, err)
			}
		}
	}
	return nil
}

// serverKeys resolves api_key and api_keys into the pool's keys, warning
// of each literal.
func (h *Handler) serverKeys() ([]proxy.ServerKey, error) {
	if err := h.validateAPIKeys(); err != nil {
		return nil, err
	}
	var configured []ServerKeyConfig
	if h.APIKey != "" {
		configured = append(configured, ServerKeyConfig{Key: h.APIKey})
	}
	if h.APIKeys != nil {
		configured = append(configured, h.APIKeys.Keys...)
	}
	if len(configured) == 0 {
		return nil, errors.New("api_key resolves to an empty value: set it, e.g. api_key {env.VIGTHORIA_API_KEY} with VIGTHORIA_API_KEY in the environment")
	}
	repl := caddy.NewReplacer()
	keys := make([]proxy.ServerKey, 0, len(configured))
	for i, k := range configured {
		label := "api_key"
		if h.APIKey == "" || i > 0 {
			label = "api_keys: key " + strconv.Itoa(i+1-min(len(h.APIKey), 1))
		}
		if !strings.Contains(k.Key, "{") {
			h.logger.Warn(label + " is a literal: it is stored in Caddy's config, readable through the admin API and autosave.json; use a placeholder such as {env.VIGTHORIA_API_KEY}")
		}
		// ReplaceAll, not ReplaceKnown: an unknown placeholder must
		// resolve to empty and fail here, not travel to the upstream as
		// a literal.
		key := repl.ReplaceAll(k.Key, "")
		if key == "" {
			return nil, fmt.Errorf("%s resolves to an empty value: set it, e.g. {env.VIGTHORIA_API_KEY} with VIGTHORIA_API_KEY in the environment", label)
		}
		keys = append(keys, proxy.ServerKey{Key: key, Name: k.Name, Weight: k.Weight, Models: k.Models})
	}
	return keys, nil
}

// keyStateTold makes what the pool tells of a key taken out or returned:
// the key's metrics, the Caddy event vigthoria.upstream_key with {key,
// state, status}, and the alerts webhook, the key by its name or
// fingerprint.
func keyStateTold(ctx caddy.Context, logger *zap.Logger, notifier *alerts.Notifier) proxy.KeyState {
	var events *caddyevents.App
	if app, err := ctx.App("events"); err == nil {
		events, _ = app.(*caddyevents.App)
	} else {
		logger.Warn("no events app: server key events are not emitted", zap.Error(err))
	}
	return func(name string, up bool, status int) {
		state := "enabled"
		if up {
			metrics.keyUp.WithLabelValues(name).Set(1)
		} else {
			state = "disabled"
			metrics.keyUp.WithLabelValues(name).Set(0)
			if status != 0 {
				metrics.keyRefusals.WithLabelValues(name).Inc()
			}
		}
		if events != nil {
			events.Emit(ctx, "vigthoria.upstream_key", map[string]any{"key": name, "state": state, "status": status})
		}
		if notifier != nil {
			notifier.KeyState(name, up, status, time.Now())
		}
	}
}

// parseAPIKeys reads the api_keys block:
//
//	api_keys {
//		<key> [name <name>] [weight <n>] [models <glob>...]
//		probe_every <duration>
//	}
func parseAPIKeys(d *caddyfile.Dispenser) (*APIKeys, error) {
	if d.NextArg() {
		return nil, d.Errf("api_keys takes a block, got '%s'", d.Val())
	}
	out := new(APIKeys)
	names := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if d.Val() == "probe_every" {
			if out.ProbeEvery != 0 {
				return nil, d.Err("probe_every given twice")
			}
			var err error
			if out.ProbeEvery, err = durationArg(d, "30s"); err != nil {
				return nil, err
			}
			continue
		}
		k := ServerKeyConfig{Key: d.Val()}
		for d.NextArg() {
			switch opt := d.Val(); opt {
			case "name", "weight":
				if !d.NextArg() {
					return nil, d.Errf("%s needs a value", opt)
				}
				if opt == "name" {
					if k.Name != "" {
						return nil, d.Err("name given twice")
					}
					k.Name = d.Val()
					if err := checkKeyName(k.Name); err != nil {
						return nil, d.Err(err.Error())
					}
					if names[k.Name] {
						return nil, d.Errf("key name '%s' given twice", k.Name)
					}
					names[k.Name] = true
					continue
				}
				n, err := strconv.Atoi(d.Val())
				if err != nil || n <= 0 || k.Weight != 0 {
					return nil, d.Errf("invalid weight '%s': want a positive whole number, once", d.Val())
				}
				k.Weight = n
			case "models":
				k.Models = d.RemainingArgs()
				if len(k.Models) == 0 {
					return nil, d.Err("models needs at least one glob")
				}
				for _, g := range k.Models {
					if err := policy.CheckGlob(g); err != nil {
						return nil, d.Errf("invalid model glob '%s': %v", g, err)
					}
				}
			default:
				return nil, d.Errf("unknown option '%s' of a server key: want name, weight or models", opt)
			}
		}
		out.Keys = append(out.Keys, k)
	}
	if len(out.Keys) == 0 {
		return nil, d.Err("api_keys needs at least one key")
	}
	return out, nil
}
