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

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"nats://svc:S3cret@host:4222":                             "nats://svc:xxxxx@host:4222",
		"nats://a:p1@h1:4222,nats://b:p2@h2:4222":                 "nats://a:xxxxx@h1:4222,nats://b:xxxxx@h2:4222",
		"nats://tok3n@host:4222":                                  "nats://xxxxx@host:4222",
		"nats://host:4222":                                        "nats://host:4222",
		"postgres://u:S3cret@db:5432/x?sslmode=disable":           "postgres://u:xxxxx@db:5432/x?sslmode=disable",
		"postgres://u@db1:5432,db2:5432/x?password=S3cret":        "postgres://u@db1:5432,db2:5432/x?password=xxxxx",
		"postgres://postgres@127.0.0.1:5432/tokenpipe":            "postgres://postgres@127.0.0.1:5432/tokenpipe",
		"host=db user=u password=S3cret dbname=x":                 "host=db user=u password=xxxxx dbname=x",
		"host=db user=u password='S3 c\\'ret' dbname=x":           "host=db user=u password=xxxxx dbname=x",
		"host=db user=u PASSWORD = S3cret sslpassword=k dbname=x": "host=db user=u PASSWORD = xxxxx sslpassword=xxxxx dbname=x",
		"https://user:pw@proxy.example/":                          "https://user:xxxxx@proxy.example/",
		"nats://svc:ab/c+d=@host:4222":                            "nats://svc:xxxxx@host:4222",
		"nats://ab/cd+ef@host:4222":                               "nats://xxxxx@host:4222",
		"postgres://u:p@ss@db:5432/x":                             "postgres://u:xxxxx@db:5432/x",
		"nats://a:p/1@h1:4222,nats://b:p@2@h2:4222":               "nats://a:xxxxx@h1:4222,nats://b:xxxxx@h2:4222",
		"connect to nats://host:4222: no servers":                 "connect to nats://host:4222: no servers",
	} {
		if got := redactURL(in); got != want {
			t.Errorf("redactURL(%q) = %q, want %q", in, got, want)
		}
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
