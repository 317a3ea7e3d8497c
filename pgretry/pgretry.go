// Package pgretry keeps the old names of the Postgres retry policy, which
// now lives in internal/store (retry.go) with every other statement on the
// token tables. New code uses the store directly.
package pgretry

import (
	"context"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/store"
)

// ActiveKeyConstraint is the partial unique index that allows one ACTIVE
// token per (client, subject, scope).
const ActiveKeyConstraint = store.ActiveKeyConstraint

// Policy bounds the retries.
type Policy = store.RetryPolicy

// DefaultPolicy suits a batch writer.
func DefaultPolicy() Policy { return store.DefaultRetryPolicy() }

// Reason names the class of a transient error; "" means permanent.
func Reason(err error) string { return store.RetryReason(err) }

// Do runs op until it succeeds, fails permanently, MaxElapsed passes or ctx
// ends (see store.Retry).
func Do[T any](ctx context.Context, p Policy, op func(ctx context.Context) (T, error), onRetry func(reason string, err error, wait time.Duration)) (T, error) {
	return store.Retry(ctx, p, op, onRetry)
}

// IsDataError reports whether Postgres rejected the data itself.
func IsDataError(err error) bool { return store.IsDataError(err) }

// IsPermanent reports whether err came from a failure that retrying cannot fix.
func IsPermanent(err error) bool { return store.IsPermanent(err) }
