// Package events defines the versioned messages that flow through the token
// pipeline, their subjects, and the JetStream stream and consumers that carry
// them.
//
// Only digests of tokens travel in events: the plaintext never leaves the
// issuer process.
package events

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// Version is the only schema version this build understands. A decoder that
// meets another version rejects the message instead of guessing, so an older
// worker never half-understands a newer issuer.
const Version = 1

// Event types carried in the "type" field.
const (
	TypeTokenIssued      = "token.issued"
	TypeTokenDeactivated = "token.deactivated"
	TypeTokenRevoked     = "token.revoked"
)

// MaxEventBytes bounds one encoded event. Real events are a few hundred bytes;
// anything larger is treated as poison rather than decoded.
const MaxEventBytes = 16 << 10

// Field limits. They are also the column limits the persister relies on.
const (
	MaxClientIDLen = 128
	MaxSubjectLen  = 256
	MaxScopeLen    = 1024
	MaxInstanceLen = 128
)

// ErrPoison marks a message that can never be processed, however often it is
// retried: it is dead-lettered, not redelivered.
var ErrPoison = errors.New("poison message")

// Digest is the SHA-256 of a token's plaintext. It is the only form in which a
// token is published or stored.
type Digest [sha256.Size]byte

// DigestOf returns the digest of a token's plaintext.
func DigestOf(plaintext string) Digest { return sha256.Sum256([]byte(plaintext)) }

// String returns the lowercase hex form used on the wire and in logs.
func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// IsZero reports whether d is unset.
func (d Digest) IsZero() bool { return d == Digest{} }

// MarshalText encodes the digest as hex.
func (d Digest) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText decodes a 64-character hex digest.
func (d *Digest) UnmarshalText(b []byte) error {
	if len(b) != hex.EncodedLen(sha256.Size) {
		return fmt.Errorf("digest must be %d hex characters, got %d", hex.EncodedLen(sha256.Size), len(b))
	}
	_, err := hex.Decode(d[:], b)
	if err != nil {
		return fmt.Errorf("digest: %w", err)
	}
	return nil
}

// ParseDigest parses the hex form of a digest.
func ParseDigest(s string) (Digest, error) {
	var d Digest
	err := d.UnmarshalText([]byte(s))
	return d, err
}

// TokenIssued is published by the issuer for every token it hands out, before
// it answers the client.
type TokenIssued struct {
	Version       int       `json:"v"`
	Type          string    `json:"type"`
	TokenDigest   Digest    `json:"token_digest"`
	RefreshDigest *Digest   `json:"refresh_digest,omitempty"`
	ClientID      string    `json:"client_id"`
	Subject       string    `json:"sub"`
	Scopes        []string  `json:"scopes"`
	GrantType     string    `json:"grant_type"`
	IssuedAt      time.Time `json:"issued_at"`
	ExpiresAt     time.Time `json:"expires_at"`
	Instance      string    `json:"instance"`
	// FamilyID names the authorization the token belongs to: revoking the
	// family revokes it even while this event is queued. Absent only in
	// events from before families existed.
	FamilyID *tokens.Family `json:"family_id,omitempty"`
	// RefreshExpiresAt is the refresh token's expiry, present with
	// RefreshDigest.
	RefreshExpiresAt *time.Time `json:"refresh_expires_at,omitempty"`
}

// Scope returns the canonical scope string: the scope set sorted and joined by
// single spaces. It is the third column of the one-ACTIVE-token key.
func (e *TokenIssued) Scope() string { return JoinScopes(e.Scopes) }

// JoinScopes joins a canonical scope set into the scope string.
func JoinScopes(scopes []string) string { return strings.Join(scopes, " ") }

// CanonicalScopes splits an RFC 6749 scope parameter into a sorted set with
// duplicates removed, so "b a a" and "a b" name the same key.
func CanonicalScopes(scope string) []string {
	parts := strings.Fields(scope)
	slices.Sort(parts)
	return slices.Compact(parts)
}

// Validate checks every field a worker relies on. An event that fails it is
// poison: it will fail the same way on every delivery.
func (e *TokenIssued) Validate() error {
	switch {
	case e.Version != Version:
		return fmt.Errorf("unsupported event version %d (this build reads %d)", e.Version, Version)
	case e.Type != TypeTokenIssued:
		return fmt.Errorf("event type %q is not %q", e.Type, TypeTokenIssued)
	case e.TokenDigest.IsZero():
		return errors.New("token_digest is missing")
	case e.RefreshDigest != nil && e.RefreshDigest.IsZero():
		return errors.New("refresh_digest is zero")
	case e.RefreshDigest != nil && *e.RefreshDigest == e.TokenDigest:
		return errors.New("refresh_digest equals token_digest")
	case e.IssuedAt.IsZero():
		return errors.New("issued_at is missing")
	case !e.ExpiresAt.After(e.IssuedAt):
		return errors.New("expires_at is not after issued_at")
	case e.RefreshExpiresAt != nil && e.RefreshDigest == nil:
		return errors.New("refresh_expires_at without refresh_digest")
	case e.RefreshExpiresAt != nil && e.RefreshExpiresAt.Before(e.ExpiresAt):
		return errors.New("refresh_expires_at is before expires_at")
	}
	if err := checkText("client_id", e.ClientID, MaxClientIDLen, true); err != nil {
		return err
	}
	if err := checkText("sub", e.Subject, MaxSubjectLen, true); err != nil {
		return err
	}
	if err := checkText("grant_type", e.GrantType, 64, true); err != nil {
		return err
	}
	if err := checkText("instance", e.Instance, MaxInstanceLen, false); err != nil {
		return err
	}
	if !slices.IsSorted(e.Scopes) || len(slices.Compact(slices.Clone(e.Scopes))) != len(e.Scopes) {
		return errors.New("scopes are not a sorted set")
	}
	for _, s := range e.Scopes {
		if s == "" || strings.ContainsAny(s, " \t\r\n") {
			return fmt.Errorf("scope %q is not a single scope token", s)
		}
	}
	return checkText("scopes", e.Scope(), MaxScopeLen, false)
}

// checkText rejects what Postgres text columns or our keys cannot hold.
func checkText(field, v string, max int, required bool) error {
	switch {
	case required && v == "":
		return fmt.Errorf("%s is missing", field)
	case len(v) > max:
		return fmt.Errorf("%s is longer than %d bytes", field, max)
	case !utf8.ValidString(v):
		return fmt.Errorf("%s is not valid UTF-8", field)
	case strings.ContainsRune(v, 0):
		return fmt.Errorf("%s contains a NUL byte", field)
	}
	return nil
}

// EncodeTokenIssued validates and encodes an event for publishing.
func EncodeTokenIssued(e *TokenIssued) ([]byte, error) {
	e.Version, e.Type = Version, TypeTokenIssued
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("encode token.issued: %w", err)
	}
	if b, ok := appendTokenIssued(make([]byte, 0, 512), e); ok {
		return b, nil
	}
	return json.Marshal(e)
}

// appendTokenIssued writes exactly what json.Marshal(e) writes, without
// reflection, for events whose strings need no escaping and whose times are
// UTC; it reports false for any other event, which then takes json.Marshal.
// The issuer encodes one event per token: reflection was most of the cost.
func appendTokenIssued(b []byte, e *TokenIssued) ([]byte, bool) {
	if !plainJSON(e.Type) || !plainJSON(e.ClientID) || !plainJSON(e.Subject) || !plainJSON(e.GrantType) ||
		!plainJSON(e.Instance) || !plainTime(e.IssuedAt) || !plainTime(e.ExpiresAt) ||
		(e.RefreshExpiresAt != nil && !plainTime(*e.RefreshExpiresAt)) {
		return nil, false
	}
	for _, s := range e.Scopes {
		if !plainJSON(s) {
			return nil, false
		}
	}
	b = append(b, `{"v":`...)
	b = strconv.AppendInt(b, int64(e.Version), 10)
	b = appendField(b, "type", e.Type)
	b = appendHexField(b, "token_digest", e.TokenDigest[:])
	if e.RefreshDigest != nil {
		b = appendHexField(b, "refresh_digest", e.RefreshDigest[:])
	}
	b = appendField(b, "client_id", e.ClientID)
	b = appendField(b, "sub", e.Subject)
	b = append(b, `,"scopes":`...)
	if e.Scopes == nil {
		b = append(b, "null"...)
	} else {
		b = append(b, '[')
		for i, s := range e.Scopes {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(append(append(b, '"'), s...), '"')
		}
		b = append(b, ']')
	}
	b = appendField(b, "grant_type", e.GrantType)
	b = appendTime(b, "issued_at", e.IssuedAt)
	b = appendTime(b, "expires_at", e.ExpiresAt)
	b = appendField(b, "instance", e.Instance)
	if e.FamilyID != nil {
		b = appendHexField(b, "family_id", e.FamilyID[:])
	}
	if e.RefreshExpiresAt != nil {
		b = appendTime(b, "refresh_expires_at", *e.RefreshExpiresAt)
	}
	return append(b, '}'), true
}

func appendField(b []byte, name, value string) []byte {
	b = append(append(append(b, `,"`...), name...), `":"`...)
	return append(append(b, value...), '"')
}

// appendHexField is appendField of hex.EncodeToString(value), without the
// string.
func appendHexField(b []byte, name string, value []byte) []byte {
	b = append(append(append(b, `,"`...), name...), `":"`...)
	return append(hex.AppendEncode(b, value), '"')
}

func appendTime(b []byte, name string, t time.Time) []byte {
	b = append(append(append(b, `,"`...), name...), `":"`...)
	return append(t.AppendFormat(b, time.RFC3339Nano), '"')
}

// plainJSON reports whether json.Marshal writes s as is between quotes:
// printable ASCII other than the quote, the backslash and the characters
// it escapes for HTML.
func plainJSON(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
	}
	return true
}

// plainTime reports whether json.Marshal writes t as RFC 3339 with a Z:
// UTC, and a year it accepts.
func plainTime(t time.Time) bool {
	return t.Location() == time.UTC && t.Year() >= 0 && t.Year() <= 9999
}

// DecodeTokenIssued decodes and validates one message body. Every error it
// returns wraps ErrPoison: the same bytes will never decode differently.
func DecodeTokenIssued(data []byte) (*TokenIssued, error) {
	if len(data) > MaxEventBytes {
		return nil, fmt.Errorf("%w: event of %d bytes exceeds %d", ErrPoison, len(data), MaxEventBytes)
	}
	var e TokenIssued
	if decodeCanonical(data, &e) {
		if err := e.Validate(); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrPoison, err)
		}
		return &e, nil
	}
	e = TokenIssued{} // the canonical reader may have set some fields
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return nil, fmt.Errorf("%w: decode token.issued: %v", ErrPoison, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data after event", ErrPoison)
	}
	if err := e.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrPoison, err)
	}
	return &e, nil
}

// TokenDeactivated is published by the recovery consumer for each token it
// turns INACTIVE, so gateways can drop the token from their caches.
type TokenDeactivated struct {
	Version       int       `json:"v"`
	Type          string    `json:"type"`
	TokenDigest   Digest    `json:"token_digest"`
	ClientID      string    `json:"client_id"`
	Subject       string    `json:"sub"`
	Scope         string    `json:"scope"`
	Reason        string    `json:"reason"`
	SupersededBy  Digest    `json:"superseded_by"`
	DeactivatedAt time.Time `json:"deactivated_at"`
}

// EncodeTokenDeactivated encodes a deactivation notice.
func EncodeTokenDeactivated(e *TokenDeactivated) ([]byte, error) {
	e.Version, e.Type = Version, TypeTokenDeactivated
	return json.Marshal(e)
}

// DecodeTokenDeactivated decodes a deactivation notice.
func DecodeTokenDeactivated(data []byte) (*TokenDeactivated, error) {
	var e TokenDeactivated
	if err := json.Unmarshal(data, &e); err != nil {
		return nil, fmt.Errorf("%w: decode token.deactivated: %v", ErrPoison, err)
	}
	if e.Version != Version || e.Type != TypeTokenDeactivated {
		return nil, fmt.Errorf("%w: unsupported event v=%d type=%q", ErrPoison, e.Version, e.Type)
	}
	return &e, nil
}

// TokenRevoked is published after a revocation commits, so every issuer
// instance drops what its introspection cache holds for the tokens. It is a
// notice: the revocation itself is already durable in Postgres.
type TokenRevoked struct {
	Version int    `json:"v"`
	Type    string `json:"type"`
	// Digests lists token rows the revocation changed.
	Digests []Digest `json:"token_digests,omitempty"`
	// Family is set when a whole family was revoked.
	Family *tokens.Family `json:"family_id,omitempty"`
	// ClientID and Subject are set for grant revocations; Subject is empty
	// when every user of the client is affected.
	ClientID  string    `json:"client_id,omitempty"`
	Subject   string    `json:"sub,omitempty"`
	Reason    string    `json:"reason"`
	RevokedAt time.Time `json:"revoked_at"`
}

// EncodeTokenRevoked encodes a revocation notice.
func EncodeTokenRevoked(e *TokenRevoked) ([]byte, error) {
	e.Version, e.Type = Version, TypeTokenRevoked
	return json.Marshal(e)
}

// DecodeTokenRevoked decodes a revocation notice.
func DecodeTokenRevoked(data []byte) (*TokenRevoked, error) {
	var e TokenRevoked
	if err := json.Unmarshal(data, &e); err != nil {
		return nil, fmt.Errorf("%w: decode token.revoked: %v", ErrPoison, err)
	}
	if e.Version != Version || e.Type != TypeTokenRevoked {
		return nil, fmt.Errorf("%w: unsupported event v=%d type=%q", ErrPoison, e.Version, e.Type)
	}
	return &e, nil
}
