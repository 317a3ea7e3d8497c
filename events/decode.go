package events

import (
	"bytes"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// decodeCanonical reads the exact form appendTokenIssued writes: its field
// order, strings that need no escaping, no white space. It reports false for
// anything else, which DecodeTokenIssued then gives to encoding/json, so both
// paths accept the same inputs and decode them to the same event; only the
// cost differs (reflection was most of the persister's decoding). The values
// go through the same unmarshalers encoding/json calls (time.Time, Digest,
// Family), so their rules are not repeated here.
func decodeCanonical(data []byte, e *TokenIssued) bool {
	p := canonical{b: data}
	if !p.lit(`{"v":`) || !p.smallInt(&e.Version) {
		return false
	}
	var typ []byte
	if !p.lit(`,"type":`) || !p.str(&typ) {
		return false
	}
	e.Type = string(typ)
	if string(typ) == TypeTokenIssued {
		e.Type = TypeTokenIssued // the common case without an allocation
	}
	if !p.lit(`,"token_digest":`) || !p.text(&e.TokenDigest) {
		return false
	}
	if p.lit(`,"refresh_digest":`) {
		e.RefreshDigest = new(Digest)
		if !p.text(e.RefreshDigest) {
			return false
		}
	}
	if !p.lit(`,"client_id":`) || !p.string(&e.ClientID) ||
		!p.lit(`,"sub":`) || !p.string(&e.Subject) ||
		!p.lit(`,"scopes":`) || !p.scopes(&e.Scopes) ||
		!p.lit(`,"grant_type":`) || !p.string(&e.GrantType) ||
		!p.lit(`,"issued_at":`) || !p.time(&e.IssuedAt) ||
		!p.lit(`,"expires_at":`) || !p.time(&e.ExpiresAt) ||
		!p.lit(`,"instance":`) || !p.string(&e.Instance) {
		return false
	}
	if p.lit(`,"family_id":`) {
		e.FamilyID = new(tokens.Family)
		if !p.text(e.FamilyID) {
			return false
		}
	}
	if p.lit(`,"refresh_expires_at":`) {
		e.RefreshExpiresAt = new(time.Time)
		if !p.time(e.RefreshExpiresAt) {
			return false
		}
	}
	return p.lit("}") && len(p.b) == 0
}

// canonical is the rest of the input, consumed from the front.
type canonical struct{ b []byte }

// lit consumes s if the input starts with it.
func (p *canonical) lit(s string) bool {
	if len(p.b) < len(s) || string(p.b[:len(s)]) != s {
		return false
	}
	p.b = p.b[len(s):]
	return true
}

// smallInt consumes a non-negative integer as strconv writes it (no sign, no
// leading zero), of at most 9 digits.
func (p *canonical) smallInt(v *int) bool {
	n, i := 0, 0
	for ; i < len(p.b) && i < 10 && p.b[i] >= '0' && p.b[i] <= '9'; i++ {
		n = n*10 + int(p.b[i]-'0')
	}
	if i == 0 || i > 9 || (i > 1 && p.b[0] == '0') {
		return false
	}
	*v, p.b = n, p.b[i:]
	return true
}

// quoted consumes a string literal of printable ASCII without escapes and
// returns it with its quotes: encoding/json decodes such a literal to its
// bytes as they are. Anything else (escapes, control characters, non-ASCII,
// which encoding/json may rewrite) is left to encoding/json.
func (p *canonical) quoted() ([]byte, bool) {
	if len(p.b) == 0 || p.b[0] != '"' {
		return nil, false
	}
	end := bytes.IndexByte(p.b[1:], '"') + 1
	if end == 0 {
		return nil, false
	}
	for _, c := range p.b[1:end] {
		if c < 0x20 || c > 0x7e || c == '\\' {
			return nil, false
		}
	}
	q := p.b[:end+1]
	p.b = p.b[end+1:]
	return q, true
}

func (p *canonical) str(v *[]byte) bool {
	q, ok := p.quoted()
	if ok {
		*v = q[1 : len(q)-1]
	}
	return ok
}

func (p *canonical) string(v *string) bool {
	var s []byte
	if !p.str(&s) {
		return false
	}
	*v = string(s)
	return true
}

// text decodes a string literal with the value's UnmarshalText, as
// encoding/json does for a TextUnmarshaler.
func (p *canonical) text(v interface{ UnmarshalText([]byte) error }) bool {
	var s []byte
	return p.str(&s) && v.UnmarshalText(s) == nil
}

// time decodes a string literal with time.Time's UnmarshalJSON, as
// encoding/json does.
func (p *canonical) time(t *time.Time) bool {
	q, ok := p.quoted()
	return ok && t.UnmarshalJSON(q) == nil
}

// scopes consumes null or an array of string literals.
func (p *canonical) scopes(v *[]string) bool {
	if p.lit("null") {
		*v = nil
		return true
	}
	if !p.lit("[") {
		return false
	}
	out := []string{}
	if p.lit("]") {
		*v = out
		return true
	}
	for {
		var s string
		if !p.string(&s) {
			return false
		}
		out = append(out, s)
		if p.lit("]") {
			*v = out
			return true
		}
		if !p.lit(",") {
			return false
		}
	}
}
