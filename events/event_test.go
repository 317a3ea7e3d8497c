package events_test

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
)

func valid() *events.TokenIssued {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	return &events.TokenIssued{
		TokenDigest: events.DigestOf("token"), ClientID: "app", Subject: "alice",
		Scopes: events.CanonicalScopes("write read read"), GrantType: "password",
		IssuedAt: now, ExpiresAt: now.Add(time.Hour), Instance: "i-1",
	}
}

func TestRoundTrip(t *testing.T) {
	e := valid()
	r := events.DigestOf("refresh")
	e.RefreshDigest = &r
	body, err := events.EncodeTokenIssued(e)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(body), `"token"`) || strings.Contains(string(body), "refresh\"") {
		t.Fatalf("encoded event leaks plaintext: %s", body)
	}
	got, err := events.DecodeTokenIssued(body)
	if err != nil {
		t.Fatal(err)
	}
	if got.TokenDigest != e.TokenDigest || *got.RefreshDigest != r || got.Scope() != "read write" || !got.IssuedAt.Equal(e.IssuedAt) {
		t.Fatalf("round trip changed the event: %+v", got)
	}
}

func TestDecodeRejectsPoison(t *testing.T) {
	good, _ := events.EncodeTokenIssued(valid())
	mutate := func(f func(m map[string]any)) []byte {
		var m map[string]any
		_ = json.Unmarshal(good, &m)
		f(m)
		b, _ := json.Marshal(m)
		return b
	}
	cases := map[string][]byte{
		"garbage":          []byte("{not json"),
		"empty":            nil,
		"unknown version":  mutate(func(m map[string]any) { m["v"] = 2 }),
		"wrong type":       mutate(func(m map[string]any) { m["type"] = "token.revoked" }),
		"unknown field":    mutate(func(m map[string]any) { m["plaintext"] = "x" }),
		"short digest":     mutate(func(m map[string]any) { m["token_digest"] = "abcd" }),
		"missing client":   mutate(func(m map[string]any) { delete(m, "client_id") }),
		"unsorted scopes":  mutate(func(m map[string]any) { m["scopes"] = []string{"write", "read"} }),
		"duplicate scopes": mutate(func(m map[string]any) { m["scopes"] = []string{"read", "read"} }),
		"NUL in subject":   mutate(func(m map[string]any) { m["sub"] = "a\x00b" }),
		"expiry before":    mutate(func(m map[string]any) { m["expires_at"] = "2020-01-01T00:00:00Z" }),
		"oversized":        append(slices.Clone(good[:len(good)-1]), []byte(`,"pad":"`+strings.Repeat("x", events.MaxEventBytes)+`"}`)...),
		"trailing data":    append(append([]byte{}, good...), []byte(`{}`)...),
	}
	for name, body := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := events.DecodeTokenIssued(body); !errors.Is(err, events.ErrPoison) {
				t.Fatalf("err = %v, want ErrPoison", err)
			}
		})
	}
}

func TestCanonicalScopes(t *testing.T) {
	got := strings.Join(events.CanonicalScopes("  b a\tc a  "), " ")
	if got != "a b c" {
		t.Fatalf("got %q", got)
	}
	if len(events.CanonicalScopes("")) != 0 {
		t.Fatal("empty scope should give an empty set")
	}
}

// FuzzDecodeTokenIssued: the decoder never panics, and whatever it accepts
// re-encodes to an event it accepts again.
func FuzzDecodeTokenIssued(f *testing.F) {
	good, _ := events.EncodeTokenIssued(valid())
	f.Add(good)
	f.Add([]byte(`{"v":1}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := events.DecodeTokenIssued(data)
		if err != nil {
			if !errors.Is(err, events.ErrPoison) {
				t.Fatalf("error does not wrap ErrPoison: %v", err)
			}
			return
		}
		again, err := events.EncodeTokenIssued(e)
		if err != nil {
			t.Fatalf("accepted event does not re-encode: %v", err)
		}
		if _, err := events.DecodeTokenIssued(again); err != nil {
			t.Fatalf("re-encoded event rejected: %v", err)
		}
	})
}
