package alerts

import "github.com/prometheus/client_golang/prometheus"

// The package's metrics, made once per process so that counts run on
// across config reloads. No label names a key.
var (
	delivered = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "alerts_delivered_total",
		Help: "Alert webhooks the receiver accepted (2xx).",
	})
	failed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "alerts_failed_total",
		Help: "Failed alert webhook attempts, by reason: status (the receiver answered other than 2xx), connection (no answer), or gave_up (an alert abandoned after its last retry).",
	}, []string{"reason"})
	dropped = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "alerts_dropped_total",
		Help: "Alerts dropped because a queue was full.",
	})
	claimErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "vigthoria", Name: "alerts_claim_errors_total",
		Help: "Alerts whose claim in the store failed; the next request past the threshold tries again.",
	})

	failedStatus     = failed.WithLabelValues("status")
	failedConnection = failed.WithLabelValues("connection")
	failedGaveUp     = failed.WithLabelValues("gave_up")
)

// Collectors returns the package's metrics, for a registry.
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{delivered, failed, dropped, claimErrors}
}
