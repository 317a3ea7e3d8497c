package issuer

import (
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// The events the issuer publishes carry UTC times whatever clock the spec's
// times came from (time.Now is in the local zone): events.EncodeTokenIssued
// takes its reflection-free path only for UTC times and falls back to
// encoding/json for any other, which cost the issuer a few µs per token.
func TestBuiltEventsCarryUTCTimes(t *testing.T) {
	t.Parallel()
	s := &Server{cfg: Config{Keys: testenv.Keys(), TokenTTL: time.Hour, RefreshTTL: 24 * time.Hour, Instance: "test"}}
	local := time.FixedZone("elsewhere", 3600)
	now := time.Now().In(local)
	rq := request{clientID: "app", subject: "alice", grant: "password", scopes: []string{"read"}, refresh: true}
	fresh, err := randomSpec(rq, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	rotated := fresh
	rotated.issuedAt, rotated.refreshIssued, rotated.refreshExpires = now, now.Add(-time.Minute), now.Add(time.Hour)
	for name, sp := range map[string]spec{"fresh": fresh, "rotated": rotated} {
		m, err := s.build(sp, time.Now())
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		e := m.event
		if e.RefreshExpiresAt == nil {
			t.Fatalf("%s: no refresh expiry in the event", name)
		}
		for field, at := range map[string]time.Time{"issued_at": e.IssuedAt, "expires_at": e.ExpiresAt, "refresh_expires_at": *e.RefreshExpiresAt} {
			if at.Location() != time.UTC {
				t.Errorf("%s: %s is in %v, not UTC", name, field, at.Location())
			}
		}
	}
}
