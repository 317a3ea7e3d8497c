package schema_test

import (
	"context"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/internal/schema"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestConcurrentUp: pods that migrate at once apply each migration exactly
// once and all succeed.
func TestConcurrentUp(t *testing.T) {
	t.Parallel()
	url, pool := testenv.Database(t) // already migrated once: drop and redo
	ctx := context.Background()
	// Everything the migrations made, whichever they are.
	_, err := pool.Exec(ctx, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
	testenv.Must(t, err, "reset schema")

	var wg sync.WaitGroup
	applied := make(chan int, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := pgxpool.New(ctx, url)
			if err != nil {
				t.Error(err)
				return
			}
			defer p.Close()
			done, err := schema.Up(ctx, p)
			if err != nil {
				t.Errorf("up: %v", err)
			}
			applied <- len(done)
		}()
	}
	wg.Wait()
	close(applied)
	total := 0
	for n := range applied {
		total += n
	}
	all, _ := schema.Migrations()
	if total != len(all) {
		t.Fatalf("migrations applied %d times in total, want %d", total, len(all))
	}
	list, err := schema.List(ctx, pool)
	testenv.Must(t, err, "list")
	for _, s := range list {
		if s.AppliedAt.IsZero() {
			t.Fatalf("migration %d pending after up", s.Version)
		}
	}
}
