// Package tokens encodes and verifies tokenpipe's bearer tokens.
//
// A token is opaque to clients but self-contained for us: it carries its
// claims (client, subject, scope, times, family) and an HMAC-SHA256 under a
// key only the issuers hold. That is what lets the asynchronous pipeline keep
// its promises before a token's row exists: introspection can say "active"
// for a token still in the queue, a refresh token can be redeemed while its
// row is being written, and a revocation can record a token it has never
// seen a row for. The database and the stream still only ever hold SHA-256
// digests of the token text.
//
// The same key derives tokens deterministically (Keyring.Derive), so that
// every issuer instance presented with the same refresh token inside the
// grace window, or the same request inside the coalescing window, mints the
// same token without sharing memory.
package tokens

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"
	"sync"
	"time"
)

// Kind tells access tokens from refresh tokens, so one can never be used as
// the other.
type Kind byte

const (
	Access  Kind = 1
	Refresh Kind = 2
)

func (k Kind) String() string {
	switch k {
	case Access:
		return "access_token"
	case Refresh:
		return "refresh_token"
	}
	return fmt.Sprintf("kind(%d)", byte(k))
}

// GrantTokenExchange is RFC 8693's grant type: per-request rotation mints
// the successor of an access token with it.
const GrantTokenExchange = "urn:ietf:params:oauth:grant-type:token-exchange"

// Grant codes as carried in a token.
var grantCodes = map[string]byte{"client_credentials": 1, "password": 2, "refresh_token": 3, GrantTokenExchange: 4}

// Family identifies one authorization and every token rotated from it.
// Revoking a family revokes all of them, including those still queued.
type Family [16]byte

// String returns the hex form used in logs and the API.
func (f Family) String() string { return hex.EncodeToString(f[:]) }

// MarshalText encodes the family as hex.
func (f Family) MarshalText() ([]byte, error) { return []byte(f.String()), nil }

// UnmarshalText decodes 32 hex characters.
func (f *Family) UnmarshalText(b []byte) error {
	if len(b) != hex.EncodedLen(len(f)) {
		return fmt.Errorf("family must be %d hex characters, got %d", hex.EncodedLen(len(f)), len(b))
	}
	if _, err := hex.Decode(f[:], b); err != nil {
		return fmt.Errorf("family: %w", err)
	}
	return nil
}

// Claims are what a token says about itself.
type Claims struct {
	Kind      Kind
	Grant     string // grant that minted it: client_credentials, password, refresh_token, GrantTokenExchange
	ClientID  string
	Subject   string
	Scope     string // canonical: sorted, space-joined
	IssuedAt  time.Time
	ExpiresAt time.Time
	Family    Family
	// Nonce makes tokens with equal claims distinct; random, or derived
	// when tokens must be identical across issuer instances.
	Nonce [16]byte
}

// ErrInvalid is returned for any token that is not one of ours, was
// tampered with, or was signed by a key no longer configured. Callers must
// not tell these cases apart to clients.
var ErrInvalid = errors.New("invalid token")

const (
	version  = 1
	macSize  = sha256.Size
	kidSize  = 4
	fixedLen = 1 + kidSize + 1 + 1 + 8 + 8 + 16 + 16 // version, kid, kind, grant, iat, exp, family, nonce
	// MaxLen bounds the text form we accept; longer input is rejected before
	// any decoding.
	MaxLen = 2048
)

// KeyMinBytes is the shortest signing key accepted.
const KeyMinBytes = 32

type key struct {
	id     [kidSize]byte
	secret []byte
	// macs holds keyed HMAC states: hmac.New costs two allocations and two
	// SHA-256 blocks for the pads on every token, Reset on a used one none.
	macs *sync.Pool
}

// newMAC returns a reset HMAC-SHA256 keyed with k; hand it back with putMAC.
func (k key) newMAC() hash.Hash {
	h := k.macs.Get().(hash.Hash)
	h.Reset()
	return h
}

func (k key) putMAC(h hash.Hash) { k.macs.Put(h) }

// Keyring signs with its first key and verifies with any of them, so keys
// can be rotated: add the new key second, roll it out, then move it first,
// then drop the old one once its tokens have expired.
type Keyring struct {
	keys []key
}

// NewKeyring builds a keyring from raw secrets of at least KeyMinBytes.
func NewKeyring(secrets ...[]byte) (*Keyring, error) {
	if len(secrets) == 0 {
		return nil, errors.New("no token key")
	}
	kr := &Keyring{}
	seen := map[[kidSize]byte]bool{}
	for i, s := range secrets {
		if len(s) < KeyMinBytes {
			return nil, fmt.Errorf("token key %d is %d bytes; at least %d are needed", i+1, len(s), KeyMinBytes)
		}
		sum := sha256.Sum256(append([]byte("tokenpipe key id\x00"), s...))
		var id [kidSize]byte
		copy(id[:], sum[:])
		if seen[id] {
			return nil, fmt.Errorf("token key %d is listed twice", i+1)
		}
		seen[id] = true
		secret := append([]byte(nil), s...)
		macs := &sync.Pool{New: func() any { return hmac.New(sha256.New, secret) }}
		kr.keys = append(kr.keys, key{id: id, secret: secret, macs: macs})
	}
	return kr, nil
}

// ParseKeys reads a comma-separated list of keys, each base64 (standard or
// URL alphabet, padded or not) or hex, as TOKENPIPE_TOKEN_KEYS holds them.
func ParseKeys(list string) (*Keyring, error) {
	var secrets [][]byte
	for i, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		b, err := decodeKey(s)
		if err != nil {
			return nil, fmt.Errorf("token key %d: %w", i+1, err)
		}
		secrets = append(secrets, b)
	}
	return NewKeyring(secrets...)
}

func decodeKey(s string) ([]byte, error) {
	if b, err := hex.DecodeString(s); err == nil {
		return b, nil
	}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	return nil, errors.New("is neither hex nor base64")
}

// Encode returns the token text for c, signed with the first key.
func (kr *Keyring) Encode(c Claims) (string, error) {
	code, ok := grantCodes[c.Grant]
	if !ok {
		return "", fmt.Errorf("encode token: unknown grant %q", c.Grant)
	}
	if c.Kind != Access && c.Kind != Refresh {
		return "", fmt.Errorf("encode token: unknown kind %d", c.Kind)
	}
	k := kr.keys[0]
	b := make([]byte, 0, fixedLen+len(c.ClientID)+len(c.Subject)+len(c.Scope)+12+macSize)
	b = append(b, version)
	b = append(b, k.id[:]...)
	b = append(b, byte(c.Kind), code)
	b = binary.BigEndian.AppendUint64(b, uint64(c.IssuedAt.UnixMilli()))
	b = binary.BigEndian.AppendUint64(b, uint64(c.ExpiresAt.UnixMilli()))
	b = append(b, c.Family[:]...)
	b = append(b, c.Nonce[:]...)
	for _, s := range []string{c.ClientID, c.Subject, c.Scope} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	b = k.mac(b, b)
	text := base64.RawURLEncoding.EncodeToString(b)
	if len(text) > MaxLen {
		return "", fmt.Errorf("encode token: %d characters exceed %d", len(text), MaxLen)
	}
	return text, nil
}

// Decode verifies text and returns its claims. It does not look at the
// clock: expiry is the caller's decision (see Claims.Expired).
func (kr *Keyring) Decode(text string) (Claims, error) {
	var c Claims
	if len(text) > MaxLen {
		return c, ErrInvalid
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(text)
	if err != nil || len(b) < fixedLen+3+macSize || b[0] != version {
		return c, ErrInvalid
	}
	body, sum := b[:len(b)-macSize], b[len(b)-macSize:]
	var k *key
	for i := range kr.keys {
		if [kidSize]byte(b[1:1+kidSize]) == kr.keys[i].id {
			k = &kr.keys[i]
		}
	}
	if k == nil || !hmac.Equal(sum, k.mac(nil, body)) {
		return c, ErrInvalid
	}
	p := body[1+kidSize:]
	c.Kind = Kind(p[0])
	for name, code := range grantCodes {
		if code == p[1] {
			c.Grant = name
		}
	}
	c.IssuedAt = time.UnixMilli(int64(binary.BigEndian.Uint64(p[2:10]))).UTC()
	c.ExpiresAt = time.UnixMilli(int64(binary.BigEndian.Uint64(p[10:18]))).UTC()
	copy(c.Family[:], p[18:34])
	copy(c.Nonce[:], p[34:50])
	p = p[50:]
	var fields [3]string
	for i := range fields {
		n, used := binary.Uvarint(p)
		if used <= 0 || n > uint64(len(p)-used) {
			return Claims{}, ErrInvalid
		}
		fields[i] = string(p[used : used+int(n)])
		p = p[used+int(n):]
	}
	if len(p) != 0 || c.Grant == "" || (c.Kind != Access && c.Kind != Refresh) {
		// A valid MAC over a body we cannot read means a newer format
		// signed with a shared key; refusing is the safe answer.
		return Claims{}, ErrInvalid
	}
	c.ClientID, c.Subject, c.Scope = fields[0], fields[1], fields[2]
	return c, nil
}

// Expired reports whether the token is past its expiry at now.
func (c Claims) Expired(now time.Time) bool { return !now.Before(c.ExpiresAt) }

// Derive returns 16 bytes that depend only on the signing key, label and
// parts. Instances that share the key derive the same value from the same
// inputs; nobody without the key can.
func (kr *Keyring) Derive(label string, parts ...[]byte) [16]byte {
	k := kr.keys[0]
	h := k.newMAC()
	defer k.putMAC(h)
	io.WriteString(h, "tokenpipe derive\x00")
	io.WriteString(h, label)
	var buf [macSize]byte
	h.Write(buf[:1]) // the 0 byte after the label
	for _, p := range parts {
		// Length prefixes keep ("ab","c") and ("a","bc") apart.
		h.Write(binary.BigEndian.AppendUint32(buf[:0], uint32(len(p))))
		h.Write(p)
	}
	var out [16]byte
	copy(out[:], h.Sum(buf[:0]))
	return out
}

// mac appends the HMAC-SHA256 of body under k to dst.
func (k key) mac(dst, body []byte) []byte {
	h := k.newMAC()
	defer k.putMAC(h)
	h.Write(body)
	return h.Sum(dst)
}
