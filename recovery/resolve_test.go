package recovery

import (
	"testing"

	"github.com/tokenpipe/tokenpipe/events"
)

func ev(client, sub, scope string, b byte) *events.TokenIssued {
	e := &events.TokenIssued{ClientID: client, Subject: sub, Scopes: events.CanonicalScopes(scope)}
	e.TokenDigest[0] = b
	return e
}

func TestResolveKeepsNewestActive(t *testing.T) {
	a, b := ev("c", "u", "read", 1), ev("c", "u", "read", 2)
	stored := map[Key]Stored{KeyOf(a): {Active: &ActiveRow{Digest: events.Digest{9}, Seq: 5}, MaxSeq: 5}}

	d := Resolve(stored, []Incoming{{Event: a, Seq: 7}, {Event: b, Seq: 6}})
	if len(d.Deactivate) != 1 || d.Deactivate[0].Digest != (events.Digest{9}) || d.Deactivate[0].By != a.TokenDigest {
		t.Fatalf("deactivate = %+v, want stored row superseded by seq 7", d.Deactivate)
	}
	for _, p := range d.Insert {
		if p.Active != (p.Seq == 7) {
			t.Fatalf("seq %d active=%v", p.Seq, p.Active)
		}
	}
}

func TestResolveNeverActivatesOlderThanStored(t *testing.T) {
	a := ev("c", "u", "read", 1)
	// The stored newest (seq 9) may be REVOKED: no ACTIVE row, yet an older
	// token arriving late must not become ACTIVE.
	stored := map[Key]Stored{KeyOf(a): {MaxSeq: 9}}
	d := Resolve(stored, []Incoming{{Event: a, Seq: 4}})
	if len(d.Deactivate) != 0 || len(d.Insert) != 1 || d.Insert[0].Active {
		t.Fatalf("decision = %+v, want one INACTIVE insert and nothing deactivated", d)
	}
}

func TestResolveKeysAreIndependent(t *testing.T) {
	a, b := ev("c", "u", "read", 1), ev("c", "u", "read write", 2)
	d := Resolve(map[Key]Stored{}, []Incoming{{Event: a, Seq: 1}, {Event: b, Seq: 2}})
	for _, p := range d.Insert {
		if !p.Active {
			t.Fatalf("token of a distinct key was not activated: %+v", p)
		}
	}
}
