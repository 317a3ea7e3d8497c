package issuer

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the issuer's Prometheus series.
type Metrics struct {
	issued         *prometheus.CounterVec
	publishErrors  *prometheus.CounterVec
	publishSeconds prometheus.Histogram
	syncRetries    prometheus.Counter
	requests       *prometheus.CounterVec
	requestsOK     prometheus.Counter // requests' child for 200, looked up once
	requestSeconds prometheus.Histogram

	coalesced         *prometheus.CounterVec
	refreshReuse      prometheus.Counter
	exchanges         *prometheus.CounterVec
	revoked           *prometheus.CounterVec
	introspectSeconds *prometheus.HistogramVec

	loginThrottled        *prometheus.CounterVec
	passwordCheckRejected *prometheus.CounterVec
}

// NewMetrics registers the issuer's series on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		issued:         prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_issuer_tokens_issued_total", Help: "Tokens handed to clients."}, []string{"grant_type"}),
		publishErrors:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_issuer_publish_errors_total", Help: "Token events JetStream did not acknowledge; no token was handed out."}, []string{"reason"}),
		publishSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokenpipe_issuer_publish_duration_seconds", Help: "Time from publish to JetStream's acknowledgement.", Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)}),
		syncRetries:    prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_issuer_sync_conflict_retries_total", Help: "Sync-mode transactions retried after losing a race for a key."}),
		requests:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_http_requests_total", Help: "HTTP requests to the OAuth endpoints and management API by status code."}, []string{"code"}),
		requestSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokenpipe_http_request_duration_seconds", Help: "HTTP request latency of the OAuth endpoints and management API.", Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18)}),
	}
	m.requestsOK = m.requests.WithLabelValues("200")
	m.coalesced = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_issuer_coalesced_total", Help: "Requests that derived a token minted before: shared (handed out again) or refused (revoked or deactivated since, so a fresh token was minted)."}, []string{"result"})
	m.refreshReuse = prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_issuer_refresh_reuse_total", Help: "Refresh tokens presented after their grace window; each revoked its family."})
	m.exchanges = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_issuer_token_exchanges_total", Help: "Token exchanges (per-request rotation) by result: first (a new successor), repeat (the same successor again, inside the batch window), refused, reuse (after the window; family revoked)."}, []string{"result"})
	m.revoked = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_issuer_revocations_total", Help: "Revocations committed, by what was revoked."}, []string{"kind"})
	m.introspectSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "tokenpipe_issuer_introspect_duration_seconds", Help: "Introspection time by where the answer came from.", Buckets: prometheus.ExponentialBuckets(0.00001, 2, 18)}, []string{"source"})
	m.loginThrottled = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_issuer_login_throttled_total", Help: "Password sign-ins refused with 429 before any password check, by endpoint (token, account, account_page, admin_page) and the limit that refused them (user_source, user, source)."}, []string{"endpoint", "limit"})
	m.passwordCheckRejected = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_issuer_password_check_rejected_total", Help: "Password sign-ins refused with 503 because every password check slot stayed busy, by endpoint (token, account, account_page, admin_page)."}, []string{"endpoint"})
	reg.MustRegister(m.issued, m.publishErrors, m.publishSeconds, m.syncRetries, m.requests, m.requestSeconds,
		m.coalesced, m.refreshReuse, m.exchanges, m.revoked, m.introspectSeconds, m.loginThrottled, m.passwordCheckRejected)
	return m
}

type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.code = code
	r.ResponseWriter.WriteHeader(code)
}

func (m *Metrics) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w, code: http.StatusOK}
		next.ServeHTTP(rec, r)
		if rec.code == http.StatusOK {
			m.requestsOK.Inc()
		} else {
			m.requests.WithLabelValues(strconv.Itoa(rec.code)).Inc()
		}
		m.requestSeconds.Observe(time.Since(start).Seconds())
	})
}
