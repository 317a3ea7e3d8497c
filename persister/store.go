package persister

import (
	"context"

	"github.com/tokenpipe/tokenpipe/internal/store"
)

// Row is one TokenIssued event with the stream sequence JetStream gave it.
type Row = store.Row

// Outcome says what a write did with one row.
type Outcome = store.Outcome

// The outcomes of a row (see store.Outcome).
const (
	Inserted = store.Inserted
	Existing = store.Existing
	Conflict = store.Conflict
)

// Beginner is what WriteBatch needs: a pool or a connection.
type Beginner = store.Beginner

// WriteBatch writes rows in one transaction and reports each row's outcome,
// in the order of rows (see store.WriteBatch).
func WriteBatch(ctx context.Context, db Beginner, rows []Row) ([]Outcome, error) {
	return store.WriteBatch(ctx, db, rows)
}
