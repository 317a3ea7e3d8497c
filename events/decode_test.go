package events

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// decodeJSON is the reference decoder: what DecodeTokenIssued did before it
// had a canonical reader, and still does for any other input.
func decodeJSON(data []byte) (*TokenIssued, bool) {
	var e TokenIssued
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if dec.Decode(&e) != nil || dec.More() {
		return nil, false
	}
	return &e, true
}

func sampleEvents() []*TokenIssued {
	now := time.Date(2026, 1, 2, 3, 4, 5, 123_456_789, time.UTC)
	base := func() *TokenIssued {
		return &TokenIssued{
			Version: Version, Type: TypeTokenIssued,
			TokenDigest: DigestOf("t"), ClientID: "app", Subject: "alice",
			Scopes: []string{"read", "write"}, GrantType: "password",
			IssuedAt: now, ExpiresAt: now.Add(time.Hour), Instance: "i-1",
		}
	}
	fam := tokens.Family{9, 8, 7}
	refresh := DigestOf("r")
	until := now.Add(24 * time.Hour)
	full := base()
	full.RefreshDigest, full.FamilyID, full.RefreshExpiresAt = &refresh, &fam, &until
	noScopes, emptyScopes, oneScope := base(), base(), base()
	noScopes.Scopes, emptyScopes.Scopes, oneScope.Scopes = nil, []string{}, []string{"a"}
	odd := base()
	odd.Subject, odd.Instance = "a b", ""
	return []*TokenIssued{base(), full, noScopes, emptyScopes, oneScope, odd}
}

// TestCanonicalMatchesJSON: every event the encoder writes takes the
// canonical reader, which decodes it exactly as encoding/json does.
func TestCanonicalMatchesJSON(t *testing.T) {
	for _, e := range sampleEvents() {
		body, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		if b, ok := appendTokenIssued(nil, e); !ok || !bytes.Equal(b, body) {
			t.Fatalf("encoder does not write json.Marshal's bytes:\n%s\n%s", b, body)
		}
		var got TokenIssued
		if !decodeCanonical(body, &got) {
			t.Fatalf("canonical reader declined the encoder's output: %s", body)
		}
		want, _ := decodeJSON(body)
		if !reflect.DeepEqual(&got, want) {
			t.Fatalf("canonical reader differs from encoding/json:\n got %+v\nwant %+v", got, *want)
		}
	}
}

// FuzzCanonicalDecode: on any input the canonical reader either declines or
// decodes exactly what encoding/json decodes; and every event it decodes
// that the encoder writes itself comes back unchanged through both.
func FuzzCanonicalDecode(f *testing.F) {
	for _, e := range sampleEvents() {
		body, _ := json.Marshal(e)
		f.Add(body)
	}
	f.Add([]byte(`{"v":01,"type":"token.issued"}`))
	f.Add([]byte(`{"v":1,"type":"a\"b"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var got TokenIssued
		if !decodeCanonical(data, &got) {
			return
		}
		want, ok := decodeJSON(data)
		if !ok {
			t.Fatalf("canonical reader accepted what encoding/json rejects: %q", data)
		}
		if !reflect.DeepEqual(&got, want) {
			t.Fatalf("canonical reader differs from encoding/json on %q:\n got %+v\nwant %+v", data, got, *want)
		}
		again, ok := appendTokenIssued(nil, &got)
		if !ok {
			return
		}
		var back TokenIssued
		if !decodeCanonical(again, &back) || !reflect.DeepEqual(&back, &got) {
			t.Fatalf("round trip changed the event:\n%s\n%s", data, again)
		}
	})
}
