package grants_test

import (
	"context"
	"crypto/rand"
	"testing"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/grants"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestRevokeUserEndsEveryGrantOfTheUser: after a password reset an operator
// ends the user's grants at every client at once; other users keep theirs.
func TestRevokeUserEndsEveryGrantOfTheUser(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, pool := testenv.Database(t)
	for _, id := range []string{"mobile", "web"} {
		_, err := clients.Add(ctx, pool, id, []string{"read"}, []string{"password"})
		testenv.Must(t, err, "add client")
	}
	insert := func(client, subject string) []byte {
		d, f := make([]byte, 32), make([]byte, 16)
		_, _ = rand.Read(d)
		_, _ = rand.Read(f)
		_, err := pool.Exec(ctx, `INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type,
			issued_at, expires_at, stream_seq, family_id) VALUES ($1, $2, $3, 'read', 'ACTIVE', 'password', now(), now() + interval '1 hour', NULL, $4)`,
			d, client, subject, f)
		testenv.Must(t, err, "insert token")
		return d
	}
	alice := [][]byte{insert("mobile", "alice"), insert("web", "alice")}
	bob := insert("mobile", "bob")

	res, err := grants.RevokeUser(ctx, pool, nil, "", "alice", store.ReasonAdmin)
	testenv.Must(t, err, "revoke user")
	if len(res.Digests) != 2 || res.Families != 2 {
		t.Fatalf("revoked %d tokens and %d families, want 2 and 2", len(res.Digests), res.Families)
	}
	state := func(d []byte) string {
		var s string
		testenv.Must(t, pool.QueryRow(ctx, `SELECT state FROM tokens WHERE token_digest = $1`, d).Scan(&s), "state")
		return s
	}
	for _, d := range alice {
		if s := state(d); s != "REVOKED" {
			t.Fatalf("alice's token is %s, want REVOKED", s)
		}
	}
	if s := state(bob); s != "ACTIVE" {
		t.Fatalf("bob's token is %s, want ACTIVE", s)
	}
	if _, err := grants.RevokeUser(ctx, pool, nil, "", "", store.ReasonAdmin); err == nil {
		t.Fatal("revoking the empty user (everybody) was accepted")
	}
}
