package clients

import (
	"context"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestDummyHashCostFollowsStoredUsers: the hash compared for an unknown user
// must have the cost users are stored with, or its answer comes back faster
// and tells that the user does not exist. It follows users added later at a
// higher cost as soon as one of them signs in.
func TestDummyHashCostFollowsStoredUsers(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	testenv.Must(t, AddUser(ctx, pool, "alice", "alice's password", 9), "add alice")
	testenv.Must(t, AddUser(ctx, pool, "bob", "bob's password", 5), "add bob")
	r := NewRegistry(pool, 0)
	dummyCost := func() int {
		t.Helper()
		if err := r.VerifyUser(ctx, "nobody", "guess"); err != ErrInvalidGrant {
			t.Fatalf("unknown user: %v", err)
		}
		hash, err := r.dummyHash(ctx)
		testenv.Must(t, err, "dummy hash")
		cost, err := bcrypt.Cost(hash)
		testenv.Must(t, err, "bcrypt cost")
		return cost
	}
	if got := dummyCost(); got != 9 {
		t.Fatalf("dummy hash cost = %d, want 9, the highest cost a user is stored with", got)
	}
	testenv.Must(t, AddUser(ctx, pool, "carol", "carol's password", 11), "add carol")
	testenv.Must(t, r.VerifyUser(ctx, "carol", "carol's password"), "carol signs in")
	if got := dummyCost(); got != 11 {
		t.Fatalf("after a user stored at cost 11 signed in, dummy hash cost = %d, want 11", got)
	}
}

// TestDummyHashWithoutUsers: with no users the dummy has bcrypt's default
// cost, which is also "tokenpipe user add"'s.
func TestDummyHashWithoutUsers(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	r := NewRegistry(pool, 0)
	hash, err := r.dummyHash(context.Background())
	testenv.Must(t, err, "dummy hash")
	if cost, _ := bcrypt.Cost(hash); cost != bcrypt.DefaultCost {
		t.Fatalf("dummy cost without users = %d, want %d", cost, bcrypt.DefaultCost)
	}
}
