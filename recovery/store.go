package recovery

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// resolveTx runs the whole rule for a batch in tx. notify is called with the
// rows about to be deactivated before the transaction commits; if it fails,
// nothing is written.
func resolveTx(ctx context.Context, tx pgx.Tx, incoming []Incoming, notify func([]Superseded) error) (Decision, error) {
	if err := store.LockShared(ctx, tx); err != nil {
		return Decision{}, err
	}
	var digests [][]byte
	for _, in := range incoming {
		digests = append(digests, in.Event.TokenDigest[:])
	}
	known, err := store.ExistingDigests(ctx, tx, digests)
	if err != nil {
		return Decision{}, err
	}
	var fresh []Incoming
	for _, in := range incoming {
		if !known[in.Event.TokenDigest] {
			fresh = append(fresh, in)
		}
	}
	if len(fresh) == 0 {
		return Decision{}, nil
	}
	keys := make([]Key, len(fresh))
	for i, in := range fresh {
		keys[i] = KeyOf(in.Event)
	}
	stored, err := store.LockKeys(ctx, tx, keys)
	if err != nil {
		return Decision{}, err
	}

	d := Resolve(stored, fresh)
	if len(d.Deactivate) > 0 {
		deact := make([]events.Digest, len(d.Deactivate))
		for i, s := range d.Deactivate {
			deact[i] = s.Digest
		}
		if err := store.Deactivate(ctx, tx, deact); err != nil {
			return Decision{}, err
		}
		// Tell gateways before the commit: a notice for a deactivation that
		// then rolls back only costs them a cache miss, while a deactivation
		// without a notice would leave a dead token cached.
		if err := notify(d.Deactivate); err != nil {
			return Decision{}, fmt.Errorf("publish deactivation notices: %w", err)
		}
	}
	rows, active := make([]store.Row, len(d.Insert)), make([]bool, len(d.Insert))
	for i, p := range d.Insert {
		rows[i], active[i] = p.Incoming, p.Active
	}
	if err := store.InsertResolved(ctx, tx, rows, active); err != nil {
		return Decision{}, err
	}
	return d, nil
}
