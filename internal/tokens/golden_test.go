package tokens

import (
	"encoding/hex"
	"sync"
	"testing"
)

// Issuers of different versions share keys during a rolling upgrade: the
// same claims must sign to the same text and the same inputs must derive
// the same values, so these outputs are pinned, from any goroutine.
func TestOutputsArePinned(t *testing.T) {
	kr := testKeyring(t, 1)
	const wantText = "AWXr8xcCAgAAAYvP5Wh7AAABi9AcVvsBAgMAAAAAAAAAAAAAAAAACQAAAAAAAAAAAAAAAAAAAANhcHAFYWxpY2UKcmVhZCB3cml0ZaYGG8zGLDi0X2FDJPHKTz6WMnjVzmhiuIWDSdhgLumn"
	const wantDerive = "435273cc74aa0530cbf635428e22e928"
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 50 {
				text, err := kr.Encode(sample())
				if err != nil {
					t.Error(err)
					return
				}
				d := kr.Derive("coalesce/access", []byte("app"), []byte("alice"), []byte("read write"), []byte{0, 1})
				if text != wantText || hex.EncodeToString(d[:]) != wantDerive {
					t.Errorf("Encode = %s, Derive = %x; want %s, %s", text, d, wantText, wantDerive)
					return
				}
				if _, err := kr.Decode(text); err != nil {
					t.Errorf("Decode: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// BenchmarkMint is the keyring's share of one coalesced token: three
// derivations and one signature.
func BenchmarkMint(b *testing.B) {
	kr, err := NewKeyring(make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	c := sample()
	b.ReportAllocs()
	for b.Loop() {
		for _, label := range []string{"coalesce/access", "coalesce/refresh", "coalesce/family"} {
			c.Nonce = kr.Derive(label, []byte("app"), []byte("alice"), []byte("read write"), []byte("client_credentials"), []byte{0, 0, 0, 0, 0, 0, 0, 1})
		}
		if _, err := kr.Encode(c); err != nil {
			b.Fatal(err)
		}
	}
}
