package clients_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestUsersAndClientsShareNoNames: a token's subject is a user name or, for
// client_credentials, the client's own id, so one name may not be both. Each
// side refuses the other's names, also when both are registered at the same
// moment from different connections.
func TestUsersAndClientsShareNoNames(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	_, err := clients.Add(ctx, pool, "other-app", nil, []string{"client_credentials"})
	testenv.Must(t, err, "add client")
	if err := clients.AddUser(ctx, pool, "other-app", "a long password", 4); err == nil {
		t.Fatal("a user named like an existing client was accepted")
	}
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", "a long password", 4), "add user")
	if _, err := clients.Add(ctx, pool, "alice", nil, []string{"client_credentials"}); err == nil {
		t.Fatal("a client named like an existing user was accepted")
	}
	// Resetting a password still works: the user is its own namesake.
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", "another long password", 4), "reset password")

	for i := range 20 {
		name := fmt.Sprintf("race-%d", i)
		var wg sync.WaitGroup
		var userErr, clientErr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			userErr = clients.AddUser(ctx, pool, name, "a long password", 4)
		}()
		go func() {
			defer wg.Done()
			_, clientErr = clients.Add(ctx, pool, name, nil, []string{"client_credentials"})
		}()
		wg.Wait()
		if (userErr == nil) == (clientErr == nil) {
			t.Fatalf("%s registered concurrently as user and client: user err %v, client err %v; want exactly one to succeed",
				name, userErr, clientErr)
		}
	}
	var both int
	testenv.Must(t, pool.QueryRow(ctx, `SELECT count(*) FROM users u JOIN clients c ON c.client_id = u.username`).Scan(&both), "count")
	if both != 0 {
		t.Fatalf("%d names are both a user and a client", both)
	}
}
