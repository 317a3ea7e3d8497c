package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// TestBadConfigIsOneLineNamingTheVariable: a role refuses to start on a bad
// value, and says which variable in a single line.
func TestBadConfigIsOneLineNamingTheVariable(t *testing.T) {
	const key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	cases := []struct {
		env, value, cmd string
		key             string // TOKENPIPE_TOKEN_KEYS, for issuer cases about another variable
	}{
		{"TOKENPIPE_BATCH_SIZE", "lots", "persister", ""},
		{"TOKENPIPE_BATCH_SIZE", "0", "persister", ""},
		{"TOKENPIPE_ACK_WAIT", "10ms", "recovery", ""},
		{"TOKENPIPE_LOG_LEVEL", "chatty", "persister", ""},
		{"TOKENPIPE_STREAM_REPLICAS", "9", "recovery", ""},
		{"TOKENPIPE_STREAM", "a.b", "persister", ""},
		{"TOKENPIPE_TOKEN_KEYS", "", "issuer", ""},
		{"TOKENPIPE_TOKEN_KEYS", "c2hvcnQ", "issuer", ""},
		{"TOKENPIPE_COALESCE_WINDOW", "3m", "issuer", key},
		{"TOKENPIPE_REFRESH_GRACE", "10m", "issuer", key},
		{"TOKENPIPE_ADMIN_TOKEN", "short", "issuer", key},
		{"TOKENPIPE_INTROSPECT_CACHE_TTL", "-1s", "issuer", key},
		{"TOKENPIPE_ISSUER_URL", "http://auth.example.com", "issuer", key},
		{"TOKENPIPE_ISSUER_URL", "https://auth.example.com/?tenant=a", "issuer", key},
		{"TOKENPIPE_ISSUER_URL", "auth.example.com", "issuer", key},
		{"TOKENPIPE_TRUSTED_PROXIES", "10.0.0.0/8,10.0.0.0/33", "issuer", key},
		{"TOKENPIPE_TLS_CERT_FILE", "no-such-file.pem", "issuer", key},
		{"TOKENPIPE_TRUSTED_PROXIES", "10.0.0.0/8,proxy.local", "issuer", key},
		{"TOKENPIPE_LOGIN_FAILURES_PER_USER_SOURCE", "0", "issuer", key},
		{"TOKENPIPE_LOGIN_FAILURES_PER_USER", "2", "issuer", key},
		{"TOKENPIPE_LOGIN_BACKOFF", "soon", "issuer", key},
		{"TOKENPIPE_LOGIN_BACKOFF_MAX", "100ms", "issuer", key},
		{"TOKENPIPE_LOGIN_FAILURE_MEMORY", "1m", "issuer", key},
		{"TOKENPIPE_PASSWORD_CHECKS", "-1", "issuer", key},
		{"TOKENPIPE_PASSWORD_CHECK_WAIT", "-1s", "issuer", key},
		{"TOKENPIPE_ADMIN_USERS", "alice,bad name", "issuer", key},
		{"TOKENPIPE_PAGE_SESSION_IDLE", "10s", "issuer", key},
		{"TOKENPIPE_PAGE_SESSION_IDLE", "48h", "issuer", key},
	}
	for _, c := range cases {
		t.Run(c.env+"="+c.value, func(t *testing.T) {
			if c.env != "TOKENPIPE_TOKEN_KEYS" {
				t.Setenv("TOKENPIPE_TOKEN_KEYS", c.key)
			}
			t.Setenv(c.env, c.value)
			var stdout, stderr bytes.Buffer
			code := run(context.Background(), []string{c.cmd}, &stdout, &stderr)
			if code == 0 {
				t.Fatal("started with a bad value")
			}
			out := strings.TrimSpace(stderr.String())
			if strings.Count(out, "\n") != 0 || !strings.Contains(out, c.env) {
				t.Fatalf("want one line naming %s, got:\n%s", c.env, out)
			}
		})
	}
}

func TestIssuerHelpListsSignInSettings(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"issuer", "-h"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{"TOKENPIPE_TRUSTED_PROXIES", "TOKENPIPE_LOGIN_FAILURES_PER_USER_SOURCE", "TOKENPIPE_LOGIN_BACKOFF_MAX", "15m", "TOKENPIPE_PASSWORD_CHECKS", "TOKENPIPE_PASSWORD_CHECK_WAIT", "500ms"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("help lacks %q:\n%s", want, stderr.String())
		}
	}
}

func TestHelpListsVariablesWithDefaults(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"persister", "-h"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, want := range []string{"TOKENPIPE_NATS_URL", "nats://127.0.0.1:4222", "TOKENPIPE_WORKERS", "TOKENPIPE_BATCH_SIZE", "1000"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("help lacks %q:\n%s", want, stderr.String())
		}
	}
}
