package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// TestStartupErrorHidesNATSPassword: a NATS URL that cannot be reached, with
// a password or token in it, fails start-up without the secret in the error
// or the output.
func TestStartupErrorHidesNATSPassword(t *testing.T) {
	const key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	for _, u := range []string{
		"nats://svc:S3cret@127.0.0.1:1",
		"nats://a:S3cret@127.0.0.1:1,nats://b:S3cret2@127.0.0.1:2",
		"nats://S3cretToken@127.0.0.1:1",
		"nats://svc:S3c%20ret@127.0.0.1:1",
		"nats://svc:S3c ret@127.0.0.1:1", // not even a valid URL
		"nats://svc:S3c/ret@127.0.0.1:1", // a base64 password, unencoded
		"nats://svc:S3c@ret@127.0.0.1:1",
	} {
		t.Run(u, func(t *testing.T) {
			t.Setenv("TOKENPIPE_NATS_URL", u)
			t.Setenv("TOKENPIPE_TOKEN_KEYS", key)
			t.Setenv("TOKENPIPE_OPS_ADDR", "")
			t.Setenv("TOKENPIPE_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable")
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), []string{"issuer"}, &stdout, &stderr); code == 0 {
				t.Fatal("started with an unreachable NATS")
			}
			out := stdout.String() + stderr.String()
			if !strings.Contains(out, "NATS") {
				t.Fatalf("the error does not mention NATS:\n%s", out)
			}
			for _, secret := range []string{"S3cret", "S3c ret", "S3c%20ret", "S3c/ret", "S3c@ret", "ret@"} {
				if strings.Contains(out, secret) {
					t.Fatalf("the output holds the password:\n%s", out)
				}
			}
			t.Logf("output: %s", strings.TrimSpace(out))
		})
	}
}

// TestStartupErrorHidesPostgresPassword: likewise for the database, in URL
// and key=value form, reachable or not, parseable or not.
func TestStartupErrorHidesPostgresPassword(t *testing.T) {
	const key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	for _, u := range []string{
		"postgres://u:S3cretPG@127.0.0.1:1/x?sslmode=disable",
		"postgres://u@127.0.0.1:1/x?sslmode=disable&password=S3cretPG",
		"host=127.0.0.1 port=1 user=u password=S3cretPG dbname=x sslmode=disable",
		"postgres://u:S3cretPG@127.0.0.1:notaport/x",
		"host=127.0.0.1 port=1 user=u password='S3cretPG' dbname=x sslmode=nonsense",
	} {
		t.Run(u, func(t *testing.T) {
			t.Setenv("TOKENPIPE_DATABASE_URL", u)
			t.Setenv("TOKENPIPE_TOKEN_KEYS", key)
			t.Setenv("TOKENPIPE_OPS_ADDR", "")
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), []string{"issuer"}, &stdout, &stderr); code == 0 {
				t.Fatal("started with an unreachable Postgres")
			}
			out := stdout.String() + stderr.String()
			if strings.Contains(out, "S3cretPG") {
				t.Fatalf("the output holds the password:\n%s", out)
			}
			t.Logf("output: %s", strings.TrimSpace(out))
		})
	}
}
