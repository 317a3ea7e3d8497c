package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestAuditFailsAboveTheWindowBound: rows clean, but one key got three
// tokens in one coalescing window.
func TestAuditFailsAboveTheWindowBound(t *testing.T) {
	dbURL, pool := testenv.Database(t)
	_, _, topo := testenv.JetStream(t)
	for k, v := range map[string]string{
		"TOKENPIPE_DATABASE_URL": dbURL, "TOKENPIPE_NATS_URL": testenv.NATSURL(), "TOKENPIPE_STREAM": topo.Stream,
		"TOKENPIPE_SUBJECT_PREFIX": topo.Prefix, "TOKENPIPE_PERSISTER_CONSUMER": topo.Persister,
		"TOKENPIPE_RECOVERY_CONSUMER": topo.Recovery, "TOKENPIPE_COALESCE_WINDOW": "",
	} {
		t.Setenv(k, v)
	}
	window := time.Now().Truncate(5 * time.Second)
	for i, state := range []string{"INACTIVE", "INACTIVE", "ACTIVE"} {
		d := events.DigestOf(strings.Repeat("x", i+1))
		_, err := pool.Exec(context.Background(), `INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type, issued_at, expires_at, stream_seq)
			VALUES ($1, 'app', 'app', 'read', $2, 'client_credentials', $3::timestamptz, $3::timestamptz + interval '1 hour', $4)`,
			d[:], state, window.Add(time.Duration(i)*time.Second), i+1)
		testenv.Must(t, err, "insert")
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"audit"}, 1, "most tokens per key per 5s window: 3 (bound 2; 1 key-windows over) (key app/app/read"},
		{[]string{"audit", "-window-bound", "3"}, 0, "most tokens per key per 5s window: 3 (bound 3; 0 key-windows over)"},
		{[]string{"audit", "-coalesce-window", "0"}, 0, "result: clean"},
		{[]string{"audit", "-client", "other"}, 0, "most tokens per key per 5s window: 0"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), c.args, &stdout, &stderr)
		if code != c.code || !strings.Contains(stdout.String(), c.want) {
			t.Errorf("%v: exit %d, want %d with %q:\n%s%s", c.args, code, c.code, c.want, stdout.String(), stderr.String())
		}
	}
}
