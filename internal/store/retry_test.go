package store

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestClassification(t *testing.T) {
	cases := []struct {
		err       error
		transient bool
		data      bool
	}{
		{&pgconn.PgError{Code: "40001"}, true, false},
		{&pgconn.PgError{Code: "40P01"}, true, false},
		{&pgconn.PgError{Code: "57P01"}, true, false},
		{&pgconn.PgError{Code: "53300"}, true, false},
		{&pgconn.PgError{Code: "08006"}, true, false},
		{&pgconn.PgError{Code: "23505", ConstraintName: ActiveKeyConstraint}, true, false},
		{&pgconn.PgError{Code: "23505", ConstraintName: "tokens_pkey"}, false, true},
		{&pgconn.PgError{Code: "22021"}, false, true},  // invalid byte sequence
		{&pgconn.PgError{Code: "42P01"}, false, false}, // missing table: operational, never dead-letter
		{fmt.Errorf("wrapped: %w", &pgconn.PgError{Code: "40001"}), true, false},
		{errors.New("unexpected EOF"), true, false},
		{context.Canceled, false, false},
	}
	for _, c := range cases {
		if got := RetryReason(c.err) != ""; got != c.transient {
			t.Errorf("%v: transient=%v, want %v", c.err, got, c.transient)
		}
		if got := IsDataError(c.err); got != c.data {
			t.Errorf("%v: data=%v, want %v", c.err, got, c.data)
		}
	}
}

func TestDoRetriesTransientThenSucceeds(t *testing.T) {
	calls := 0
	p := RetryPolicy{Initial: time.Millisecond, Max: 5 * time.Millisecond, MaxElapsed: time.Second, Attempt: time.Second}
	v, err := Retry(context.Background(), p, func(context.Context) (int, error) {
		calls++
		if calls < 3 {
			return 0, &pgconn.PgError{Code: "40P01"}
		}
		return 42, nil
	}, nil)
	if err != nil || v != 42 || calls != 3 {
		t.Fatalf("v=%d err=%v calls=%d", v, err, calls)
	}
	calls = 0
	_, err = Retry(context.Background(), p, func(context.Context) (int, error) {
		calls++
		return 0, &pgconn.PgError{Code: "22021"}
	}, nil)
	if err == nil || calls != 1 {
		t.Fatalf("permanent error retried: calls=%d err=%v", calls, err)
	}
}
