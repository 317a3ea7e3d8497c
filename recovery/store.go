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
	var d Decision
	pending := fresh
	for round := 1; len(pending) > 0; round++ {
		if round > maxRounds {
			// Hand the batch back to the retry policy: a new transaction.
			return Decision{}, fmt.Errorf("%d keys activated by other writers in each of %d rounds: %w", len(pending), maxRounds, store.ErrConcurrentActivation)
		}
		next, lost, err := resolveRound(ctx, tx, pending, notify)
		if err != nil {
			return Decision{}, err
		}
		d.Deactivate = append(d.Deactivate, next.Deactivate...)
		for _, p := range next.Insert {
			if !lost[p.Event.TokenDigest] {
				d.Insert = append(d.Insert, p)
			}
		}
		pending = pending[:0:0]
		for _, in := range fresh {
			if lost[in.Event.TokenDigest] {
				pending = append(pending, in)
			}
		}
	}
	return d, nil
}

// afterLock, when set by a test, runs between a round's lock and its writes.
var afterLock func()

// maxRounds bounds how often one transaction resolves keys again that other
// writers activated under it.
const maxRounds = 5

// resolveRound locks the keys of incoming, applies the rule and writes its
// decision. lost holds the tokens meant ACTIVE whose key another writer
// activated after the lock was taken (the key had no ACTIVE row to lock, so
// this round changed nothing of it); they must be resolved again.
func resolveRound(ctx context.Context, tx pgx.Tx, incoming []Incoming, notify func([]Superseded) error) (Decision, map[events.Digest]bool, error) {
	keys := make([]Key, len(incoming))
	for i, in := range incoming {
		keys[i] = KeyOf(in.Event)
	}
	stored, err := store.LockKeys(ctx, tx, keys)
	if err != nil {
		return Decision{}, nil, err
	}
	if afterLock != nil {
		afterLock()
	}
	d := Resolve(stored, incoming)
	if len(d.Deactivate) > 0 {
		deact := make([]events.Digest, len(d.Deactivate))
		for i, s := range d.Deactivate {
			deact[i] = s.Digest
		}
		if err := store.Deactivate(ctx, tx, deact); err != nil {
			return Decision{}, nil, err
		}
		// Tell gateways before the commit: a notice for a deactivation that
		// then rolls back only costs them a cache miss, while a deactivation
		// without a notice would leave a dead token cached.
		if err := notify(d.Deactivate); err != nil {
			return Decision{}, nil, fmt.Errorf("publish deactivation notices: %w", err)
		}
	}
	rows, active := make([]store.Row, len(d.Insert)), make([]bool, len(d.Insert))
	for i, p := range d.Insert {
		rows[i], active[i] = p.Incoming, p.Active
	}
	lostIdx, err := store.InsertResolved(ctx, tx, rows, active)
	if err != nil {
		return Decision{}, nil, err
	}
	lost := make(map[events.Digest]bool, len(lostIdx))
	for _, i := range lostIdx {
		lost[rows[i].Event.TokenDigest] = true
	}
	return d, lost, nil
}
