package recovery

import (
	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// Key is the one-ACTIVE-token key (see store.Key).
type Key = store.Key

// KeyOf returns the key of an event.
func KeyOf(e *events.TokenIssued) Key { return store.KeyOf(e) }

// Stored is what the database holds for a key.
type Stored = store.KeyState

// ActiveRow identifies a key's ACTIVE row.
type ActiveRow = store.ActiveRow

// Incoming is a conflicting event and its original stream sequence.
type Incoming = store.Row

// Decision is what one transaction must do.
type Decision struct {
	// Insert holds every incoming token with the state it gets.
	Insert []Placed
	// Deactivate lists ACTIVE rows that a newer token supersedes, with the
	// digest of the token that supersedes each.
	Deactivate []Superseded
}

// Placed is an incoming token and its state.
type Placed struct {
	Incoming
	Active bool
}

// Superseded is an ACTIVE row that must become INACTIVE.
type Superseded struct {
	Digest events.Digest
	By     events.Digest
	Key    Key
}

// Resolve applies the conflict rule: of all tokens of a key, the one with the
// highest stream sequence is ACTIVE and every other is INACTIVE. The stream
// sequence is the order in which JetStream accepted the tokens; the issuer
// answers only after that, so a client that received token A before asking
// for token B always holds the higher sequence on B. Issue times from
// different issuer clocks give no such guarantee, and sequences never tie.
//
// Because the rule looks only at sequences, the final table is the same in
// whatever order events arrive, however often they are redelivered.
func Resolve(stored map[Key]Stored, incoming []Incoming) Decision {
	newest := map[Key]Incoming{}
	for _, in := range incoming {
		k := KeyOf(in.Event)
		if cur, ok := newest[k]; !ok || in.Seq > cur.Seq {
			newest[k] = in
		}
	}
	var d Decision
	winners := map[events.Digest]bool{}
	for k, win := range newest {
		st := stored[k]
		if win.Seq <= st.MaxSeq {
			continue // a newer token is already stored: nothing activates
		}
		winners[win.Event.TokenDigest] = true
		if st.Active != nil {
			d.Deactivate = append(d.Deactivate, Superseded{Digest: st.Active.Digest, By: win.Event.TokenDigest, Key: k})
		}
	}
	for _, in := range incoming {
		d.Insert = append(d.Insert, Placed{Incoming: in, Active: winners[in.Event.TokenDigest]})
	}
	return d
}
