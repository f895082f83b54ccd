package vigthoria

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"

	"github.com/vigthoria/caddy-vigthoria/alerts"
	"github.com/vigthoria/caddy-vigthoria/caller/keys"
)

// Alerts configures what happens when a caller's use of its quota or
// budget crosses a threshold, and when a request of a caller is first
// refused for want of either in a period: a Caddy event
// (vigthoria.quota, vigthoria.budget, vigthoria.quota_refused,
// vigthoria.budget_refused) is emitted, and with a webhook a signed JSON
// POST is sent, once per key, threshold (or refusal) and period, even
// across a fleet of instances sharing a store.
type Alerts struct {
	// The http or https URL alerts are POSTed to, signed per the Standard
	// Webhooks spec. Placeholders are resolved. Default: none, events only.
	Webhook string `json:"webhook,omitempty"`

	// The webhook's signing secret, "whsec_" and the base64 of 24 to 64
	// random bytes. Required with webhook. Use a placeholder such as
	// {env.VIGTHORIA_WEBHOOK_SECRET}: a literal secret is readable in
	// Caddy's config (GET /config/, autosave.json).
	Secret string `json:"secret,omitempty"`

	// The thresholds, in percent of the quota or budget, each 1 to 100.
	// Default: [80, 100].
	At []int `json:"at,omitempty"`
}

// alertSenders holds the webhook senders, one per webhook URL and
// secret, so that alerts still being retried survive a config reload.
var alertSenders = caddy.NewUsagePool()

type pooledSender struct{ *alerts.Sender }

func (p pooledSender) Destruct() error {
	p.Close()
	return nil
}

// provisionAlerts sets the alerts' defaults and starts their Notifier;
// cleanupAlerts releases what it took.
func (h *Handler) provisionAlerts(ctx caddy.Context) error {
	if h.Alerts == nil {
		h.Alerts = new(Alerts)
	}
	if len(h.Alerts.At) == 0 {
		h.Alerts.At = slices.Clone(alerts.DefaultThresholds)
	}
	cfg := alerts.Config{Thresholds: h.Alerts.At, Claimer: alertClaimer{h.keys}, Logger: ctx.Logger().Named("alerts")}
	repl := caddy.NewReplacer()
	if hook := repl.ReplaceAll(h.Alerts.Webhook, ""); hook != "" {
		if u, err := url.Parse(hook); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("alerts: webhook '%s' is not an http or https URL", h.Alerts.Webhook)
		}
		raw := repl.ReplaceAll(h.Alerts.Secret, "")
		secret, err := alerts.ParseSecret(raw)
		if err != nil {
			return fmt.Errorf("alerts: %w", err)
		}
		sum := sha256.Sum256([]byte(raw))
		h.alertSender = hook + " " + hex.EncodeToString(sum[:])
		s, _, err := alertSenders.LoadOrNew(h.alertSender, func() (caddy.Destructor, error) {
			return pooledSender{alerts.NewSender(alerts.SenderConfig{URL: hook, Secret: secret, Logger: caddy.Log().Named("vigthoria.alerts")})}, nil
		})
		if err != nil {
			return err
		}
		cfg.Webhook = s.(pooledSender).Sender
	} else if h.Alerts.Secret != "" {
		return errors.New("alerts: a secret without a webhook")
	}
	events, err := ctx.App("events")
	if err != nil {
		return fmt.Errorf("alerts: loading the events app: %w", err)
	}
	cfg.Emit = func(name string, data map[string]any) { events.(*caddyevents.App).Emit(ctx, name, data) }
	h.notifier, err = alerts.NewNotifier(cfg)
	return err
}

func (h *Handler) cleanupAlerts() error {
	if h.notifier != nil {
		h.notifier.Close()
	}
	if h.alertSender == "" {
		return nil
	}
	_, err := alertSenders.Delete(h.alertSender)
	return err
}

// alertClaimer claims alerts in the key store.
type alertClaimer struct{ keys *keys.Service }

func (c alertClaimer) Claim(ctx context.Context, id string, until time.Time) (bool, error) {
	return c.keys.ClaimAlert(ctx, id, until)
}
