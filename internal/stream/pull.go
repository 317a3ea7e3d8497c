package stream

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// puller takes what a consumer has now for a pool, with no-wait pull
// requests of its own answered on an inbox that lives as long as the pool;
// one worker at a time uses it (the pool's gate).
//
// The NATS client's FetchNoWait gives up one second after the last message
// it received and unsubscribes its inbox, so a batch the server sends later
// (a starved process, a slow link) went to nobody and stayed ack pending
// until the ack wait. Here a late answer lands in the same inbox and is
// taken by the next fetch, so nothing the server delivers is orphaned, and a
// stop drains the inbox before the worker returns.
type puller struct {
	nc      *nats.Conn
	subject string // the consumer's MSG.NEXT API subject
	inbox   string // each request answers on inbox.<n>
	sub     *nats.Subscription
	n       uint64 // requests sent
}

// errNoAnswer: the server did not answer a pull request within answerWait.
var errNoAnswer = errors.New("no answer to the pull request")

func newPuller(js jetstream.JetStream, cons jetstream.Consumer) (*puller, error) {
	info := cons.CachedInfo()
	if info == nil {
		return nil, errors.New("pull: consumer without info")
	}
	nc := js.Conn()
	// Not a request-mux inbox: JetStream delivers under each message's own
	// subject, which the client's request mux would take for the answer to
	// any single request in flight on the connection.
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox + ".*")
	if err != nil {
		return nil, fmt.Errorf("pull: subscribe to the inbox: %w", err)
	}
	// The inbox holds at most one batch per request; the limits are the
	// client's defaults, stated so a change of them shows here.
	if err := sub.SetPendingLimits(nats.DefaultSubPendingMsgsLimit, nats.DefaultSubPendingBytesLimit); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("pull: inbox limits: %w", err)
	}
	return &puller{nc: nc, subject: apiPrefix(js) + "CONSUMER.MSG.NEXT." + info.Stream + "." + info.Name,
		inbox: inbox, sub: sub}, nil
}

// apiPrefix is the JetStream API prefix js sends its requests to.
func apiPrefix(js jetstream.JetStream) string {
	o := js.Options()
	switch {
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	case o.APIPrefix != "":
		return strings.TrimSuffix(o.APIPrefix, ".") + "."
	default:
		return jetstream.DefaultAPIPrefix
	}
}

// fetch returns up to n messages the consumer has now. Messages of an
// earlier request that arrived late come first. Each request answers on a
// reply subject of its own, so only its own end marker ends it: a late
// marker of an earlier request would otherwise end a later one before its
// messages arrived.
func (p *puller) fetch(ctx context.Context, n int) ([]jetstream.Msg, error) {
	msgs := make([]jetstream.Msg, 0, n)
	// What is already in the inbox: late messages, and the end markers of
	// earlier requests (skipped: they end nothing now).
	for len(msgs) < n {
		m, err := p.sub.NextMsg(time.Nanosecond)
		if err != nil {
			break
		}
		if _, isStatus := status(m); !isStatus {
			msgs = append(msgs, pulled{m})
		}
	}
	if len(msgs) == n {
		return msgs, nil
	}
	req := strconv.AppendInt([]byte(`{"no_wait":true,"batch":`), int64(n-len(msgs)), 10)
	req = append(req, '}')
	p.n++
	reply := p.inbox + "." + strconv.FormatUint(p.n, 10)
	if err := p.nc.PublishRequest(p.subject, reply, req); err != nil {
		return msgs, fmt.Errorf("pull request: %w", err)
	}
	// A fetch that waited answerWait returns what it has; the rest arrives
	// for the next one.
	wait, cancel := context.WithTimeout(ctx, answerWait)
	defer cancel()
	for len(msgs) < n {
		m, err := p.sub.NextMsgWithContext(wait)
		if err != nil {
			if len(msgs) > 0 || ctx.Err() != nil {
				return msgs, nil
			}
			if errors.Is(err, context.DeadlineExceeded) {
				return nil, errNoAnswer
			}
			return nil, fmt.Errorf("pull: %w", err)
		}
		code, isStatus := status(m)
		if !isStatus {
			msgs = append(msgs, pulled{m})
			continue
		}
		if m.Subject != reply || code == "100" {
			continue // the end of an earlier request that answered late, or a heartbeat
		}
		if err := endOfRequest(code, m.Header.Get("Description")); err != nil && len(msgs) == 0 {
			return nil, err
		}
		return msgs, nil
	}
	return msgs, nil
}

// endOfRequest interprets the status that ends a pull request, as the
// client's own fetch does: no messages, an expired request, or a consumer
// changing leader or a server shutting down end it normally (the worker
// fetches again); anything else (a deleted consumer, a refused request) is
// an error the worker backs off from.
func endOfRequest(code, description string) error {
	d := strings.ToLower(description)
	switch {
	case code == "404", code == "408":
		return nil
	case code == "409" && (strings.Contains(d, "leadership change") || strings.Contains(d, "server shutdown") || strings.Contains(d, "batch completed")):
		return nil
	case code == "409" && strings.Contains(d, "consumer deleted"):
		return fmt.Errorf("pull: %w", jetstream.ErrConsumerDeleted)
	default:
		return fmt.Errorf("pull: status %s %s", code, description)
	}
}

// drain withdraws the inbox and returns every message that was on its way
// to it (the unsubscribe is confirmed by a round trip, so a message the
// server sent before it arrives first).
func (p *puller) drain(limit time.Duration) []jetstream.Msg {
	var msgs []jetstream.Msg
	if err := p.sub.Drain(); err != nil {
		_ = p.sub.Unsubscribe()
	}
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		m, err := p.sub.NextMsg(time.Until(deadline))
		if err != nil {
			if errors.Is(err, nats.ErrTimeout) {
				continue // the drain has not confirmed yet
			}
			break // drained: the subscription is gone
		}
		if _, isStatus := status(m); !isStatus {
			msgs = append(msgs, pulled{m})
		}
	}
	return msgs
}

// status reports whether m is a status message of the pull protocol (no
// payload, no reply, a Status header) and its code. A stream message always
// has a reply subject (its ack subject), whatever its headers.
func status(m *nats.Msg) (string, bool) {
	if len(m.Data) > 0 || m.Header == nil || m.Reply != "" {
		return "", false
	}
	code := m.Header.Get("Status")
	return code, code != ""
}

// pulled is a message taken by a puller, as the jetstream package's own
// messages behave: the acknowledgements are the client's (which refuse a
// second ack), the metadata comes from the reply subject.
type pulled struct{ m *nats.Msg }

var _ jetstream.Msg = pulled{}

func (p pulled) Data() []byte         { return p.m.Data }
func (p pulled) Headers() nats.Header { return p.m.Header }
func (p pulled) Subject() string      { return p.m.Subject }
func (p pulled) Reply() string        { return p.m.Reply }
func (p pulled) Ack() error           { return p.m.Ack() }
func (p pulled) Nak() error           { return p.m.Nak() }
func (p pulled) InProgress() error    { return p.m.InProgress() }
func (p pulled) Term() error          { return p.m.Term() }
func (p pulled) NakWithDelay(d time.Duration) error {
	return p.m.NakWithDelay(d)
}

func (p pulled) DoubleAck(ctx context.Context) error { return p.m.AckSync(nats.Context(ctx)) }

// TermWithReason terminates the message and tells the server why; the old
// client API has no such call, so the +TERM body is written here as the
// jetstream package writes it.
func (p pulled) TermWithReason(reason string) error {
	if reason == "" {
		return p.m.Term()
	}
	if p.m.Sub == nil || p.m.Reply == "" {
		return jetstream.ErrMsgNotBound
	}
	return p.m.Respond([]byte("+TERM " + reason))
}

func (p pulled) Metadata() (*jetstream.MsgMetadata, error) {
	md, err := p.m.Metadata()
	if err != nil {
		return nil, err
	}
	return &jetstream.MsgMetadata{
		Sequence:     jetstream.SequencePair{Consumer: md.Sequence.Consumer, Stream: md.Sequence.Stream},
		NumDelivered: md.NumDelivered, NumPending: md.NumPending, Timestamp: md.Timestamp,
		Stream: md.Stream, Consumer: md.Consumer, Domain: md.Domain,
	}, nil
}
