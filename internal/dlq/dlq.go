// Package dlq lets operators inspect, re-drive and purge dead letters: the
// copies of poison messages that the persister, recovery or a replay put on
// the dead subject with the reason and the origin of each.
//
// Message bodies hold token digests, never plaintext; even so, listings show
// only the first 12 hex characters of a digest, and a body's fields that are
// not part of a TokenIssued event are named but not printed.
package dlq

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/replay"
)

// Letter is one dead letter.
type Letter struct {
	Seq           uint64      `json:"seq"`
	Time          time.Time   `json:"time"`
	Reason        string      `json:"reason"`
	OriginSubject string      `json:"origin_subject"`
	OriginSeq     uint64      `json:"origin_seq"` // 0 if missing or invalid
	Header        nats.Header `json:"-"`
	Data          []byte      `json:"-"`
}

func letterOf(seq uint64, t time.Time, h nats.Header, data []byte) Letter {
	l := Letter{Seq: seq, Time: t, Header: h, Data: data,
		Reason: h.Get(events.HeaderReason), OriginSubject: h.Get(events.HeaderOriginSubject)}
	l.OriginSeq, _ = strconv.ParseUint(h.Get(events.HeaderOriginSeq), 10, 64)
	return l
}

// Key is what a dead letter's body says about its token, read leniently so
// that most poison still shows whose token it was.
type Key struct {
	ClientID string `json:"client_id"`
	Subject  string `json:"sub"`
	Scope    string `json:"scope"`
	Digest   string `json:"digest"` // first 12 hex characters, or "" if absent or not hex
}

// Key decodes the key fields of the body, if it is a JSON object at all.
func (l *Letter) Key() (Key, bool) {
	var b struct {
		ClientID    any `json:"client_id"`
		Subject     any `json:"sub"`
		Scopes      any `json:"scopes"`
		TokenDigest any `json:"token_digest"`
	}
	if err := json.Unmarshal(l.Data, &b); err != nil {
		return Key{}, false
	}
	k := Key{ClientID: str(b.ClientID), Subject: str(b.Subject), Digest: shortDigest(b.TokenDigest)}
	if scopes, ok := b.Scopes.([]any); ok {
		for i, s := range scopes {
			if i > 0 {
				k.Scope += " "
			}
			k.Scope += str(s)
		}
	}
	return k, true
}

func str(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	return ""
}

// shortDigest shows a digest's first 12 hex characters. A value that is not
// hex is never shown: a broken issuer might have put a plaintext token there.
func shortDigest(v any) string {
	s, ok := v.(string)
	if !ok || len(s) < 12 {
		return ""
	}
	if _, err := hex.DecodeString(s[:12]); err != nil {
		return ""
	}
	return s[:12]
}

// List returns every dead letter in stream order, read through an ordered
// consumer that is removed afterwards.
func List(ctx context.Context, js jetstream.JetStream, topo events.Topology) ([]Letter, error) {
	var out []Letter
	err := replay.Scan(ctx, js, topo.Stream, topo.DeadSubject(), 1, false, func(m jetstream.Msg) error {
		meta, err := m.Metadata()
		if err != nil {
			return err
		}
		out = append(out, letterOf(meta.Sequence.Stream, meta.Timestamp, m.Headers(), m.Data()))
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list dead letters: %w", err)
	}
	return out, nil
}

// ErrNotDeadLetter is returned by Get for a sequence that holds no dead
// letter.
var ErrNotDeadLetter = errors.New("not a dead letter")

// Get returns the dead letter at stream sequence seq.
func Get(ctx context.Context, js jetstream.JetStream, topo events.Topology, seq uint64) (*Letter, error) {
	stream, err := js.Stream(ctx, topo.Stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	msg, err := stream.GetMsg(ctx, seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, fmt.Errorf("sequence %d: %w (no such message)", seq, ErrNotDeadLetter)
	}
	if err != nil {
		return nil, fmt.Errorf("get message %d: %w", seq, err)
	}
	if msg.Subject != topo.DeadSubject() {
		return nil, fmt.Errorf("sequence %d is on %s: %w", seq, msg.Subject, ErrNotDeadLetter)
	}
	l := letterOf(msg.Sequence, msg.Time, msg.Header, msg.Data)
	return &l, nil
}

// Count returns how many dead letters the stream holds.
func Count(ctx context.Context, js jetstream.JetStream, topo events.Topology) (uint64, error) {
	stream, err := js.Stream(ctx, topo.Stream)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(topo.DeadSubject()))
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	return info.State.Subjects[topo.DeadSubject()], nil
}

// Purge removes every dead letter and nothing else, and returns how many
// there were just before.
func Purge(ctx context.Context, js jetstream.JetStream, topo events.Topology) (uint64, error) {
	n, err := Count(ctx, js, topo)
	if err != nil {
		return 0, err
	}
	stream, err := js.Stream(ctx, topo.Stream)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject(topo.DeadSubject())); err != nil {
		return 0, fmt.Errorf("purge %s: %w", topo.DeadSubject(), err)
	}
	return n, nil
}
