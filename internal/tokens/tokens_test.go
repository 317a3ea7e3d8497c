package tokens

import (
	"bytes"
	"encoding/base64"
	"errors"
	"testing"
	"time"
)

func testKeyring(t *testing.T, seeds ...byte) *Keyring {
	t.Helper()
	var secrets [][]byte
	for _, s := range seeds {
		secrets = append(secrets, bytes.Repeat([]byte{s}, 32))
	}
	kr, err := NewKeyring(secrets...)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

func sample() Claims {
	now := time.UnixMilli(1_700_000_000_123).UTC()
	return Claims{Kind: Refresh, Grant: "password", ClientID: "app", Subject: "alice", Scope: "read write",
		IssuedAt: now, ExpiresAt: now.Add(time.Hour), Family: Family{1, 2, 3}, Nonce: [16]byte{9}}
}

func TestRoundTrip(t *testing.T) {
	kr := testKeyring(t, 1)
	c := sample()
	text, err := kr.Encode(c)
	if err != nil {
		t.Fatal(err)
	}
	got, err := kr.Decode(text)
	if err != nil {
		t.Fatal(err)
	}
	if got != c {
		t.Fatalf("round trip: got %+v, want %+v", got, c)
	}
}

func TestRejectsTampering(t *testing.T) {
	kr := testKeyring(t, 1)
	text, _ := kr.Encode(sample())
	raw, _ := base64.RawURLEncoding.DecodeString(text)
	for i := range raw {
		b := bytes.Clone(raw)
		b[i] ^= 0x01
		if _, err := kr.Decode(base64.RawURLEncoding.EncodeToString(b)); !errors.Is(err, ErrInvalid) {
			t.Fatalf("flipping byte %d was accepted", i)
		}
	}
	for _, bad := range []string{"", "x", text[:len(text)-1], text + "A", "not base64!"} {
		if _, err := kr.Decode(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("Decode(%q) = %v, want ErrInvalid", bad, err)
		}
	}
}

func TestKeyRotation(t *testing.T) {
	old, both, next := testKeyring(t, 1), testKeyring(t, 2, 1), testKeyring(t, 2)
	text, _ := old.Encode(sample())
	if _, err := both.Decode(text); err != nil {
		t.Fatalf("a token of the old key must verify while the old key is listed: %v", err)
	}
	if _, err := next.Decode(text); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a token of a dropped key verified: %v", err)
	}
}

func TestDeriveDependsOnEveryInput(t *testing.T) {
	a, b := testKeyring(t, 1), testKeyring(t, 2)
	base := a.Derive("x", []byte("ab"), []byte("c"))
	if base != a.Derive("x", []byte("ab"), []byte("c")) {
		t.Fatal("Derive is not deterministic")
	}
	for name, other := range map[string][16]byte{
		"label":  a.Derive("y", []byte("ab"), []byte("c")),
		"split":  a.Derive("x", []byte("a"), []byte("bc")),
		"key":    b.Derive("x", []byte("ab"), []byte("c")),
		"append": a.Derive("x", []byte("ab"), []byte("c"), nil),
	} {
		if other == base {
			t.Errorf("changing the %s did not change the derived value", name)
		}
	}
}

func TestParseKeys(t *testing.T) {
	hexKey := "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	b64Key := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))
	if _, err := ParseKeys(hexKey + ", " + b64Key); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "short", hexKey + "," + hexKey, "zz!" + hexKey} {
		if _, err := ParseKeys(bad); err == nil {
			t.Errorf("ParseKeys(%q) accepted", bad)
		}
	}
}

func FuzzDecode(f *testing.F) {
	kr, _ := NewKeyring(bytes.Repeat([]byte{1}, 32))
	text, _ := kr.Encode(sample())
	f.Add(text)
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := kr.Decode(s)
		if err != nil {
			return
		}
		// Anything that verifies must re-encode to the same text.
		again, err := kr.Encode(c)
		if err != nil || again != s {
			t.Fatalf("decoded %q but re-encoded %q (%v)", s, again, err)
		}
	})
}
