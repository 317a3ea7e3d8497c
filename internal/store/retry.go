// Retry classification: which Postgres failures are worth retrying, and
// retries with exponential backoff and jitter.

package store

import (
	"context"
	"errors"
	"net"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5/pgconn"
)

// ActiveKeyConstraint is the partial unique index that allows one ACTIVE
// token per (client, subject, scope).
const ActiveKeyConstraint = "tokens_one_active_per_key"

// ErrConcurrentActivation: other writers kept activating tokens of a batch's
// keys while recovery resolved them; a new transaction reads the new state.
var ErrConcurrentActivation = errors.New("concurrent activation")

// ErrNotLocked: Deactivate was given rows its transaction had not locked
// with LockKeys (a caller's bug; the transaction must not commit).
var ErrNotLocked = errors.New("rows to deactivate were not locked by this transaction")

// RetryReason names the class of a transient error for metrics and logs; "" means
// the error is permanent: retrying the same statement would fail the same way.
func RetryReason(err error) string {
	if err == nil {
		return ""
	}
	if errors.Is(err, ErrConcurrentActivation) {
		return "concurrent_activation"
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch {
		case pe.Code == "40001":
			return "serialization_failure"
		case pe.Code == "40P01":
			return "deadlock"
		case pe.Code == "57P01" || pe.Code == "57P02" || pe.Code == "57P03":
			return "admin_shutdown"
		case pe.Code == "53300":
			return "too_many_connections"
		case pe.Code == "55P03":
			return "lock_not_available"
		case pe.Code == "23505" && pe.ConstraintName == ActiveKeyConstraint:
			// Another transaction activated a token for the same key between
			// our read and our insert: the next attempt reads the new state.
			return "concurrent_activation"
		case pe.Code[:2] == "08":
			return "connection"
		case pe.Code[:2] == "53":
			return "insufficient_resources"
		}
		return ""
	}
	if errors.Is(err, context.Canceled) {
		return ""
	}
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) || pgconn.SafeToRetry(err) {
		return "connection"
	}
	var ce *pgconn.ConnectError
	if errors.As(err, &ce) {
		return "connection"
	}
	// Anything else from the driver without a SQLSTATE is a broken or closed
	// connection (EOF, reset, "conn closed"): the server never judged the
	// statement, so it is worth another try on a fresh connection.
	return "connection"
}

// RetryPolicy bounds the retries.
type RetryPolicy struct {
	Initial    time.Duration // first delay
	Max        time.Duration // largest delay
	MaxElapsed time.Duration // give up after this much time in total
	Attempt    time.Duration // timeout of one attempt
}

// DefaultRetryPolicy suits a batch writer.
func DefaultRetryPolicy() RetryPolicy {
	return RetryPolicy{Initial: 20 * time.Millisecond, Max: 5 * time.Second, MaxElapsed: 2 * time.Minute, Attempt: 30 * time.Second}
}

// Retry runs op until it succeeds, fails permanently, MaxElapsed passes or ctx
// ends. onRetry is told about each transient failure before the wait.
func Retry[T any](ctx context.Context, p RetryPolicy, op func(ctx context.Context) (T, error), onRetry func(reason string, err error, wait time.Duration)) (T, error) {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = p.Initial, p.Max, p.MaxElapsed
	b.RandomizationFactor = 0.5
	return backoff.RetryNotifyWithData(func() (T, error) {
		attemptCtx, cancel := context.WithTimeout(ctx, p.Attempt)
		defer cancel()
		v, err := op(attemptCtx)
		if err != nil && (ctx.Err() != nil || RetryReason(err) == "") {
			return v, backoff.Permanent(err)
		}
		return v, err
	}, backoff.WithContext(b, ctx), func(err error, wait time.Duration) {
		if onRetry != nil {
			onRetry(RetryReason(err), err, wait)
		}
	})
}

// IsDataError reports whether Postgres rejected the data itself (SQLSTATE
// classes 22 data exception, 23 integrity constraint violation, 54 program
// limit exceeded): the same row will fail the same way forever, so it may be
// dead-lettered. Anything else that is not transient (a missing table, a
// permission, a bug in a statement) is an operational fault to fix, and must
// never cost a token its row.
func IsDataError(err error) bool {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || RetryReason(err) != "" {
		return false
	}
	switch pe.Code[:2] {
	case "22", "23", "54":
		return true
	}
	return false
}

// IsPermanent reports whether err came from a failure that retrying cannot fix.
func IsPermanent(err error) bool { return err != nil && RetryReason(err) == "" }

// isUniqueViolation reports whether err is a unique violation (23505) on any
// index.
func isUniqueViolation(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "23505"
}
