package audit_test

import (
	"context"
	"strings"
	"testing"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

func insert(t *testing.T, exec func(string, ...any), e *events.TokenIssued, state string, seq int64) {
	t.Helper()
	exec(`INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type, issued_at, expires_at, stream_seq)
	      VALUES ($1, $2, $3, $4, $5, 'client_credentials', now(), now() + interval '1 hour', $6)`,
		e.TokenDigest[:], e.ClientID, e.Subject, e.Scope(), state, seq)
}

func TestAuditFindsEachViolation(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	exec := func(sql string, args ...any) {
		_, err := pool.Exec(ctx, sql, args...)
		testenv.Must(t, err, sql)
	}
	ok := testenv.Token("app", "u1", "read")
	insert(t, exec, ok, "ACTIVE", 1)
	clean, err := audit.Check(ctx, pool, []events.Digest{ok.TokenDigest}, nil)
	testenv.Must(t, err, "audit")
	if !clean.Clean() {
		t.Fatalf("clean table reported dirty: %+v", clean)
	}

	lost := testenv.Token("app", "u2", "read")
	// An ACTIVE row older than an INACTIVE one of the same key: the newest
	// token lost its place. The unique index cannot catch this; the audit must.
	older, newer := testenv.Token("app", "u3", "read"), testenv.Token("app", "u3", "read")
	insert(t, exec, older, "ACTIVE", 5)
	insert(t, exec, newer, "INACTIVE", 6)
	r, err := audit.Check(ctx, pool, []events.Digest{ok.TokenDigest, lost.TokenDigest, older.TokenDigest, newer.TokenDigest}, nil)
	testenv.Must(t, err, "audit")
	if len(r.Missing) != 1 || r.Missing[0] != lost.TokenDigest {
		t.Fatalf("missing = %v, want the lost token", r.Missing)
	}
	if len(r.ActiveNotNewest) != 1 || !strings.HasPrefix(r.ActiveNotNewest[0], "app/u3/") {
		t.Fatalf("active-not-newest = %v", r.ActiveNotNewest)
	}
	if r.Clean() {
		t.Fatal("dirty table reported clean")
	}
}

func TestReadDigests(t *testing.T) {
	d := events.DigestOf("x")
	got, err := audit.ReadDigests(strings.NewReader("# header\n\n" + d.String() + "\n"))
	if err != nil || len(got) != 1 || got[0] != d {
		t.Fatalf("got %v, %v", got, err)
	}
	if _, err := audit.ReadDigests(strings.NewReader("nothex\n")); err == nil {
		t.Fatal("accepted a bad line")
	}
}
