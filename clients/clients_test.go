package clients_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

func TestSecretIsShownOnceAndStoredAsDigest(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	secret, err := clients.Add(ctx, pool, "app", []string{"write", "read", "read"}, []string{"client_credentials"})
	testenv.Must(t, err, "add")
	if len(secret) < 43 {
		t.Fatalf("secret of %d characters is shorter than 256 bits in base64url", len(secret))
	}
	var stored []byte
	var scopes []string
	testenv.Must(t, pool.QueryRow(ctx, "SELECT secret_digest, scopes FROM clients WHERE client_id = 'app'").Scan(&stored, &scopes), "read")
	want := sha256.Sum256([]byte(secret))
	if string(stored) != string(want[:]) {
		t.Fatal("stored value is not the secret's SHA-256 digest")
	}
	if len(scopes) != 2 || scopes[0] != "read" || scopes[1] != "write" {
		t.Fatalf("scopes = %v, want the canonical set", scopes)
	}
	if _, err := clients.Add(ctx, pool, "app", nil, []string{"client_credentials"}); err == nil {
		t.Fatal("a second client with the same id was accepted")
	}
	for _, bad := range [][]string{{"implicit"}, {}} {
		if _, err := clients.Add(ctx, pool, "other", nil, bad); err == nil {
			t.Fatalf("grants %v accepted", bad)
		}
	}
	if _, err := clients.Add(ctx, pool, "has space", nil, []string{"client_credentials"}); err == nil {
		t.Fatal("a client id with a space was accepted")
	}
}

func TestAuthenticateAndCache(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	secret, err := clients.Add(ctx, pool, "app", []string{"read"}, []string{"client_credentials"})
	testenv.Must(t, err, "add")
	reg := clients.NewRegistry(pool, 200*time.Millisecond)
	c, err := reg.Authenticate(ctx, "app", secret)
	if err != nil || c.ID != "app" || !c.AllowsScope("read") || c.AllowsScope("write") {
		t.Fatalf("authenticate: %+v %v", c, err)
	}
	for _, tc := range []struct{ id, secret string }{{"app", "wrong"}, {"nobody", secret}, {"app", ""}} {
		if _, err := reg.Authenticate(ctx, tc.id, tc.secret); !errors.Is(err, clients.ErrInvalidClient) {
			t.Fatalf("%q/%q: err = %v, want ErrInvalidClient", tc.id, tc.secret, err)
		}
	}
	testenv.Must(t, clients.Remove(ctx, pool, "app"), "remove")
	// Within the TTL the cached registration still answers; after it, not.
	if _, err := reg.Authenticate(ctx, "app", secret); err != nil {
		t.Fatalf("cached client refused within the TTL: %v", err)
	}
	time.Sleep(250 * time.Millisecond)
	if _, err := reg.Authenticate(ctx, "app", secret); !errors.Is(err, clients.ErrInvalidClient) {
		t.Fatalf("removed client accepted after the TTL: %v", err)
	}
}

func TestVerifyUser(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", "correct horse", 4), "add user")
	reg := clients.NewRegistry(pool, time.Minute)
	if err := reg.VerifyUser(ctx, "alice", "correct horse"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ user, pass string }{{"alice", "wrong horse"}, {"bob", "correct horse"}} {
		if err := reg.VerifyUser(ctx, tc.user, tc.pass); !errors.Is(err, clients.ErrInvalidGrant) {
			t.Fatalf("%s: err = %v", tc.user, err)
		}
	}
	if err := clients.AddUser(ctx, pool, "short", "1234", 4); err == nil {
		t.Fatal("a 4-byte password was accepted")
	}
}

// TestLastKnownClientServesWhilePostgresIsAway: after the TTL, a failed
// lookup falls back to the last known registration instead of refusing.
func TestLastKnownClientServesWhilePostgresIsAway(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	secret, err := clients.Add(ctx, pool, "app", []string{"read"}, []string{"client_credentials"})
	testenv.Must(t, err, "add")
	reg := clients.NewRegistry(pool, 50*time.Millisecond)
	_, err = reg.Authenticate(ctx, "app", secret)
	testenv.Must(t, err, "first authentication")
	pool.Close() // the database is now unreachable for this registry
	time.Sleep(100 * time.Millisecond)
	if _, err := reg.Authenticate(ctx, "app", secret); err != nil {
		t.Fatalf("known client refused while Postgres is away: %v", err)
	}
	if _, err := reg.Authenticate(ctx, "app", "wrong"); !errors.Is(err, clients.ErrInvalidClient) {
		t.Fatalf("wrong secret accepted from the stale entry: %v", err)
	}
	if _, err := reg.Authenticate(ctx, "stranger", "x"); err == nil || errors.Is(err, clients.ErrInvalidClient) {
		t.Fatalf("unknown client during the outage: err = %v, want a lookup error (503), not invalid_client", err)
	}
}
