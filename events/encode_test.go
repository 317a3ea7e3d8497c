package events_test

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// EncodeTokenIssued must write exactly what json.Marshal writes: events
// already in the stream, and issuers of other versions in a rolling upgrade,
// produce those bytes.
func TestEncodeMatchesJSONMarshal(t *testing.T) {
	london, err := time.LoadLocation("Europe/London")
	if err != nil {
		t.Fatal(err)
	}
	fam := tokens.Family{1, 2, 0xfe}
	refresh := events.DigestOf("refresh")
	until := time.Date(2026, 2, 3, 4, 5, 6, 789_000_000, time.UTC)
	cases := map[string]func(*events.TokenIssued){
		"plain":          func(*events.TokenIssued) {},
		"milliseconds":   func(e *events.TokenIssued) { e.IssuedAt = time.UnixMilli(1_700_000_000_123).UTC() },
		"nanoseconds":    func(e *events.TokenIssued) { e.ExpiresAt = e.ExpiresAt.Add(1) },
		"family":         func(e *events.TokenIssued) { e.FamilyID = &fam },
		"refresh":        func(e *events.TokenIssued) { e.RefreshDigest, e.RefreshExpiresAt = &refresh, &until },
		"html":           func(e *events.TokenIssued) { e.Subject = "a<b>&c" },
		"quote":          func(e *events.TokenIssued) { e.ClientID = `a"b\c` },
		"control":        func(e *events.TokenIssued) { e.Instance = "i\t1\x7f" },
		"unicode":        func(e *events.TokenIssued) { e.Subject = "zoë\u2028" },
		"scope escaping": func(e *events.TokenIssued) { e.Scopes = []string{"a&b", "c"} },
		"no scopes":      func(e *events.TokenIssued) { e.Scopes = nil },
		"local time":     func(e *events.TokenIssued) { e.IssuedAt = e.IssuedAt.In(london) },
		"offset time":    func(e *events.TokenIssued) { e.ExpiresAt = e.ExpiresAt.In(time.FixedZone("x", 3600)) },
		"local refresh":  func(e *events.TokenIssued) { u := until.Local(); e.RefreshDigest, e.RefreshExpiresAt = &refresh, &u },
	}
	for name, change := range cases {
		e := valid()
		change(e)
		got, err := events.EncodeTokenIssued(e)
		if err != nil {
			// Validation refused it: nothing to compare.
			t.Logf("%s: %v", name, err)
			continue
		}
		want, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s:\n got %s\nwant %s", name, got, want)
		}
	}
}

// BenchmarkEncodeTokenIssued: the issuer encodes one event per token.
func BenchmarkEncodeTokenIssued(b *testing.B) {
	e := valid()
	fam := tokens.Family{1}
	e.FamilyID = &fam
	b.ReportAllocs()
	for b.Loop() {
		if _, err := events.EncodeTokenIssued(e); err != nil {
			b.Fatal(err)
		}
	}
}
