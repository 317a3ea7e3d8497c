package clients_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

func TestSecretIsShownOnceAndStoredAsDigest(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	secret, err := clients.Add(ctx, pool, "app", []string{"write", "read", "read"}, []string{"client_credentials"})
	testenv.Must(t, err, "add")
	if raw, err := base64.RawURLEncoding.DecodeString(secret); err != nil || len(raw) != 32 {
		t.Fatalf("secret %d characters long is not 256 bits of unpadded base64url (%v)", len(secret), err)
	}
	other, err := clients.Add(ctx, pool, "other-app", nil, []string{"client_credentials"})
	testenv.Must(t, err, "add another")
	if other == secret {
		t.Fatal("two clients got the same secret")
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
	reg := clients.NewRegistry(pool, time.Second)
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
	time.Sleep(1100 * time.Millisecond)
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

func TestAddValidates(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	cc := []string{"client_credentials"}
	cases := []struct {
		name           string
		id             string
		scopes, grants []string
	}{
		{"empty id", "", nil, cc},
		{"long id", strings.Repeat("a", 129), nil, cc},
		{"id with space", "has space", nil, cc},
		{"id with colon", "a:b", nil, cc},
		{"id with control character", "a\tb", nil, cc},
		{"id not UTF-8", "a\xffb", nil, cc},
		{"two scopes in one", "c", []string{"read write"}, cc},
		{"empty scope", "c", []string{""}, cc},
		{"scope with quote", "c", []string{`a"b`}, cc},
		{"scope with backslash", "c", []string{`a\b`}, cc},
		{"non-ASCII scope", "c", []string{"lesenä"}, cc},
		{"no grants", "c", nil, nil},
		{"unknown grant", "c", nil, []string{"implicit"}},
		{"two grants in one", "c", nil, []string{"client_credentials password"}},
	}
	for _, c := range cases {
		if _, err := clients.Add(ctx, pool, c.id, c.scopes, c.grants); err == nil {
			t.Errorf("%s: accepted", c.name)
		}
	}
	var n int
	testenv.Must(t, pool.QueryRow(ctx, "SELECT count(*) FROM clients").Scan(&n), "count")
	if n != 0 {
		t.Fatalf("rejected clients left %d rows", n)
	}
	_, err := clients.Add(ctx, pool, strings.Repeat("a", 128), []string{"a:read", "b/write~"}, []string{"refresh_token", "password", "password"})
	testenv.Must(t, err, "a 128-byte id and URI-like scopes")
}

func TestListAndRemove(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	_, err := clients.Add(ctx, pool, "b", []string{"x"}, []string{"password", "client_credentials"})
	testenv.Must(t, err, "add b")
	_, err = clients.Add(ctx, pool, "a", nil, []string{"client_credentials"})
	testenv.Must(t, err, "add a")
	list, err := clients.List(ctx, pool)
	testenv.Must(t, err, "list")
	if len(list) != 2 || list[0].ID != "a" || list[1].ID != "b" {
		t.Fatalf("list = %+v, want a and b in order", list)
	}
	if strings.Join(list[1].Grants, ",") != "client_credentials,password" || strings.Join(list[1].Scopes, " ") != "x" || list[1].CreatedAt.IsZero() {
		t.Fatalf("b = %+v", list[1])
	}
	for _, c := range list {
		if c.SecretDigest != [sha256.Size]byte{} {
			t.Fatal("List returned a secret digest")
		}
	}
	testenv.Must(t, clients.Remove(ctx, pool, "a"), "remove a")
	if err := clients.Remove(ctx, pool, "a"); !errors.Is(err, clients.ErrNotFound) {
		t.Fatalf("removing a missing client: %v, want ErrNotFound", err)
	}
	if err := clients.RemoveUser(ctx, pool, "nobody"); !errors.Is(err, clients.ErrNotFound) {
		t.Fatalf("removing a missing user: %v, want ErrNotFound", err)
	}
}

// TestCacheServesWithoutPostgresWithinTTL: a cached client answers without a
// query, so closing the pool changes nothing within the TTL; and an unknown
// client is remembered as unknown for the TTL too.
func TestCacheServesWithoutPostgresWithinTTL(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	secret, err := clients.Add(ctx, pool, "app", []string{"read"}, []string{"client_credentials"})
	testenv.Must(t, err, "add")
	reg := clients.NewRegistry(pool, time.Second)
	_, err = reg.Authenticate(ctx, "app", secret)
	testenv.Must(t, err, "first authentication")
	if _, err := reg.Authenticate(ctx, "late", "x"); !errors.Is(err, clients.ErrInvalidClient) {
		t.Fatalf("unknown client: %v", err)
	}
	lateSecret, err := clients.Add(ctx, pool, "late", nil, []string{"client_credentials"})
	testenv.Must(t, err, "add late")
	if _, err := reg.Authenticate(ctx, "late", lateSecret); !errors.Is(err, clients.ErrInvalidClient) {
		t.Fatalf("a client added within the TTL of its miss was accepted at once: %v", err)
	}
	time.Sleep(1100 * time.Millisecond)
	if _, err := reg.Authenticate(ctx, "late", lateSecret); err != nil {
		t.Fatalf("a client added before the TTL ran out is still refused: %v", err)
	}
	_, err = reg.Authenticate(ctx, "app", secret) // refresh app's entry
	testenv.Must(t, err, "refresh")

	// The cache answers concurrently, and without the database.
	pool.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := reg.Authenticate(ctx, "app", secret)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		testenv.Must(t, err, "cached authentication with the pool closed")
	}
	if _, err := reg.Authenticate(ctx, "stranger", "x"); err == nil || errors.Is(err, clients.ErrInvalidClient) {
		t.Fatalf("an uncached client with the pool closed: %v, want a lookup error", err)
	}
}

// TestMalformedNamesAreRefusedNotErrors: bytes Postgres cannot store must be
// a failed login, not a database error the issuer would answer with 503.
func TestMalformedNamesAreRefusedNotErrors(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	reg := clients.NewRegistry(pool, 0)
	for _, id := range []string{"\xff\xfe", "a\x00b", strings.Repeat("x", 1000)} {
		if _, err := reg.Authenticate(ctx, id, "secret"); !errors.Is(err, clients.ErrInvalidClient) {
			t.Errorf("client %q: %v, want ErrInvalidClient", id, err)
		}
		if err := reg.VerifyUser(ctx, id, "password"); !errors.Is(err, clients.ErrInvalidGrant) {
			t.Errorf("user %q: %v, want ErrInvalidGrant", id, err)
		}
	}
}

func TestAddUserReplacesPassword(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", "first password", 4), "add")
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", "second password", 4), "reset")
	var hash string
	testenv.Must(t, pool.QueryRow(ctx, "SELECT password_hash FROM users WHERE username = 'alice'").Scan(&hash), "read")
	if !strings.HasPrefix(hash, "$2") || strings.Contains(hash, "password") {
		t.Fatalf("stored %q is not a bcrypt hash", hash)
	}
	reg := clients.NewRegistry(pool, time.Minute)
	if err := reg.VerifyUser(ctx, "alice", "first password"); !errors.Is(err, clients.ErrInvalidGrant) {
		t.Fatalf("old password: %v", err)
	}
	testenv.Must(t, reg.VerifyUser(ctx, "alice", "second password"), "new password")
	testenv.Must(t, clients.RemoveUser(ctx, pool, "alice"), "remove")
	if err := reg.VerifyUser(ctx, "alice", "second password"); !errors.Is(err, clients.ErrInvalidGrant) {
		t.Fatalf("removed user: %v", err)
	}
}

// TestSetGrant: one grant goes on or off, the others stay, and the registry
// that forgets the client sees the change at once.
func TestSetGrant(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	secret, err := clients.Add(ctx, pool, "mobile", []string{"read"}, []string{"password", "refresh_token"})
	testenv.Must(t, err, "add")
	reg := clients.NewRegistry(pool, time.Hour)
	c, err := reg.Authenticate(ctx, "mobile", secret)
	testenv.Must(t, err, "authenticate")
	if !c.Allows("refresh_token") {
		t.Fatal("refresh_token not allowed after add")
	}
	testenv.Must(t, clients.SetGrant(ctx, pool, "mobile", "refresh_token", false), "refresh off")
	testenv.Must(t, clients.SetGrant(ctx, pool, "mobile", "refresh_token", false), "refresh off twice")
	if c, _ := reg.Authenticate(ctx, "mobile", secret); !c.Allows("refresh_token") {
		t.Fatal("the cached registration changed before Forget: the test does not show what Forget does")
	}
	reg.Forget("mobile")
	c, err = reg.Authenticate(ctx, "mobile", secret)
	testenv.Must(t, err, "authenticate after forget")
	if c.Allows("refresh_token") || !c.Allows("password") {
		t.Fatalf("grants after refresh off = %v, want [password]", c.Grants)
	}
	testenv.Must(t, clients.SetGrant(ctx, pool, "mobile", "client_credentials", true), "cc on")
	testenv.Must(t, clients.SetGrant(ctx, pool, "mobile", "password", false), "password off")
	list, err := clients.List(ctx, pool)
	testenv.Must(t, err, "list")
	if len(list) != 1 || strings.Join(list[0].Grants, ",") != "client_credentials" {
		t.Fatalf("grants = %v, want [client_credentials]", list[0].Grants)
	}
	if err := clients.SetGrant(ctx, pool, "mobile", "implicit", true); err == nil {
		t.Fatal("an unknown grant was accepted")
	}
	if err := clients.SetGrant(ctx, pool, "nobody", "password", true); !errors.Is(err, clients.ErrNotFound) {
		t.Fatalf("unknown client: err = %v, want ErrNotFound", err)
	}
}

// TestRotationWindow: a client's own rotation window is set at add or
// later, read by the registry and List, returned to the issuers' default
// with nil; values out of bounds are refused and change nothing.
func TestRotationWindow(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	two := 2 * time.Second
	secret, err := clients.AddWith(ctx, pool, "spa", []string{"read"}, []string{"password"}, clients.Options{RotationWindow: &two})
	testenv.Must(t, err, "add with a window")
	plainSecret, err := clients.Add(ctx, pool, "plain", nil, []string{"client_credentials"})
	testenv.Must(t, err, "add")
	window := func(id, secret string) *time.Duration {
		t.Helper()
		c, err := clients.NewRegistry(pool, time.Hour).Authenticate(ctx, id, secret)
		testenv.Must(t, err, "authenticate "+id)
		return c.RotationWindow
	}
	if w := window("spa", secret); w == nil || *w != two {
		t.Fatalf("spa's window = %v, want 2s", w)
	}
	if w := window("plain", plainSecret); w != nil {
		t.Fatalf("a client added without a window has %v, want nil (the issuers' default)", *w)
	}
	zero := time.Duration(0)
	testenv.Must(t, clients.SetRotationWindow(ctx, pool, "plain", &zero), "set 0")
	if w := window("plain", plainSecret); w == nil || *w != 0 {
		t.Fatalf("plain's window after setting 0 = %v, want 0", w)
	}
	for _, bad := range []time.Duration{-time.Second, 6 * time.Minute, 1500 * time.Microsecond} {
		if err := clients.SetRotationWindow(ctx, pool, "spa", &bad); err == nil {
			t.Errorf("window %s accepted", bad)
		}
		if _, err := clients.AddWith(ctx, pool, "other", nil, []string{"password"}, clients.Options{RotationWindow: &bad}); err == nil {
			t.Errorf("add with window %s accepted", bad)
		}
	}
	if err := clients.SetRotationWindow(ctx, pool, "nobody", &two); !errors.Is(err, clients.ErrNotFound) {
		t.Fatalf("unknown client: err = %v, want ErrNotFound", err)
	}
	testenv.Must(t, clients.SetRotationWindow(ctx, pool, "spa", nil), "back to the default")
	list, err := clients.List(ctx, pool)
	testenv.Must(t, err, "list")
	for _, c := range list {
		if c.ID == "spa" && c.RotationWindow != nil || c.ID == "plain" && (c.RotationWindow == nil || *c.RotationWindow != 0) || c.ID == "other" {
			t.Fatalf("listed %s with window %v", c.ID, c.RotationWindow)
		}
	}
}
