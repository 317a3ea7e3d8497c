package issuer

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/netip"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/throttle"
)

// errPasswordChecksBusy: every password check slot stayed taken for the
// whole wait.
var errPasswordChecksBusy = &oauthError{status: http.StatusServiceUnavailable, code: "temporarily_unavailable",
	desc: "too many sign-ins are being checked; retry shortly"}

// checkPassword verifies a user's password for the password grant and the
// account API (endpoint names which, for the metrics). The throttle comes
// first, so a refused try costs no hashing; then a slot of the bounded
// hashing pool. It returns clients.ErrInvalidGrant for a wrong password or
// unknown user, a 429 oauthError ("slow_down", with Retry-After) while the
// user or source is backing off, errPasswordChecksBusy when no slot freed in
// time.
//
// "slow_down" is RFC 8628's code for a client asking too often; RFC 6749
// has none for rate limiting, and stock clients show the code and
// description of any error answer.
func (s *Server) checkPassword(r *http.Request, endpoint, user, pass string) error {
	attempt, refusal := s.logins.Begin(throttleUser(user), s.loginSource(r))
	if refusal != nil {
		s.metrics.loginThrottled.WithLabelValues(endpoint, string(refusal.Limit)).Inc()
		return &oauthError{status: http.StatusTooManyRequests, code: "slow_down",
			desc: "too many failed sign-ins; retry after the time in Retry-After", retryAfter: refusal.RetryAfter}
	}
	var err error
	if busy := s.hashers.Do(r.Context(), func() { err = s.registry.VerifyUser(r.Context(), user, pass) }); busy != nil {
		attempt.Abandon()
		if errors.Is(busy, throttle.ErrBusy) {
			s.metrics.passwordCheckRejected.WithLabelValues(endpoint).Inc()
			return errPasswordChecksBusy
		}
		return fmt.Errorf("wait for a password check: %w", busy)
	}
	switch {
	case err == nil:
		attempt.Succeeded()
	case errors.Is(err, clients.ErrInvalidGrant):
		attempt.Failed()
	default:
		attempt.Abandon()
	}
	return err
}

// loginSource is the address a sign-in is counted against. An IPv6 client
// usually holds a whole /64, so that is one source: otherwise each guess
// could come from a fresh address.
func (s *Server) loginSource(r *http.Request) string {
	a := s.cfg.TrustedProxies.ClientIP(r)
	switch {
	case !a.IsValid():
		return "unknown"
	case a.Is6():
		return netip.PrefixFrom(a, 64).Masked().String()
	}
	return a.String()
}

// throttleUser keys the throttle by user name. Names longer than any valid
// one (which can only fail) are hashed, so the throttle does not keep
// kilobytes of them.
func throttleUser(user string) string {
	if len(user) <= events.MaxClientIDLen {
		return user
	}
	sum := sha256.Sum256([]byte(user))
	return "sha256:" + hex.EncodeToString(sum[:])
}
