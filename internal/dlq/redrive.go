package dlq

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/replay"
)

// Outcome is what Replay did with one dead letter.
type Outcome struct {
	Seq       uint64 `json:"seq"`
	Persisted bool   `json:"persisted"` // the token has its row now (new or already there)
	Removed   bool   `json:"removed"`   // the dead letter was deleted after that
	Detail    string `json:"detail"`    // why it was left, if it was
}

// Report is the outcome of every dead letter and the write counts.
type Report struct {
	Outcomes []Outcome
	Written  replay.Result
}

// writeChunk bounds one transaction, as the persister's batch size does.
const writeChunk = 500

// Replay decodes each dead letter again and, if it now decodes (after a
// fix), persists it through the pipeline's write path with the stream
// sequence of its ORIGINAL TokenIssued event. Letters that still fail are
// reported and left in place. Persisted letters are deleted from the stream
// unless keep is set; the original events stay on the issued subject.
//
// It stops at the first failure that is not about a letter itself (the
// database is unreachable, say) and returns what it did until then.
func Replay(ctx context.Context, w *replay.Writer, letters []Letter, keep bool) (*Report, error) {
	topo := w.Topology
	stream, err := w.JS.Stream(ctx, topo.Stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	rep := &Report{Outcomes: make([]Outcome, len(letters))}
	var (
		items    []replay.Item
		carriers [][]int // carriers[i]: the letters that carry items[i]
		byDigest = map[events.Digest]int{}
	)
	for i, l := range letters {
		rep.Outcomes[i].Seq = l.Seq
		ev, err := events.DecodeTokenIssued(l.Data)
		if err != nil {
			rep.Outcomes[i].Detail = "still poison: " + err.Error()
			continue
		}
		seq, err := originSeq(ctx, stream, topo, &l)
		if err != nil {
			rep.Outcomes[i].Detail = err.Error()
			continue
		}
		if j, ok := byDigest[ev.TokenDigest]; ok {
			items[j].Seq = min(items[j].Seq, seq)
			carriers[j] = append(carriers[j], i)
			continue
		}
		byDigest[ev.TokenDigest] = len(items)
		items = append(items, replay.Item{Event: ev, Seq: seq})
		carriers = append(carriers, []int{i})
	}

	for lo := 0; lo < len(items); lo += writeChunk {
		chunk := items[lo:min(lo+writeChunk, len(items))]
		res, err := w.Write(ctx, chunk)
		rep.Written.Inserted += res.Inserted
		rep.Written.Present += res.Present
		rep.Written.Resolved += res.Resolved
		rep.Written.Deactivated += res.Deactivated
		rep.Written.Rejected = append(rep.Written.Rejected, res.Rejected...)
		if err != nil {
			return rep, err
		}
		rejected := map[events.Digest]error{}
		for _, r := range res.Rejected {
			rejected[r.Event.TokenDigest] = r.Err
		}
		for j, it := range chunk {
			for _, i := range carriers[lo+j] {
				o := &rep.Outcomes[i]
				if err := rejected[it.Event.TokenDigest]; err != nil {
					o.Detail = "rejected by Postgres: " + err.Error()
					continue
				}
				o.Persisted = true
				if keep {
					continue
				}
				if err := stream.DeleteMsg(ctx, o.Seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
					o.Detail = "persisted, but the dead letter could not be removed: " + err.Error()
					continue
				}
				o.Removed = true
			}
		}
	}
	return rep, nil
}

// originSeq finds the stream sequence of the TokenIssued event a dead
// letter came from. Recovery dead-letters the conflict COPY, whose sequence
// is not the event's: the copy's own header holds the original, so it is
// read from the copy while the stream still has it.
func originSeq(ctx context.Context, stream jetstream.Stream, topo events.Topology, l *Letter) (uint64, error) {
	if l.OriginSeq == 0 {
		return 0, fmt.Errorf("no valid %s header: the original sequence is unknown", events.HeaderOriginSeq)
	}
	switch {
	case topo.IsIssuedSubject(l.OriginSubject):
		return l.OriginSeq, nil
	case l.OriginSubject == topo.ConflictSubject():
		copyMsg, err := stream.GetMsg(ctx, l.OriginSeq)
		if err != nil {
			return 0, fmt.Errorf("conflict copy %d is gone (%v), so the original sequence is unknown; replay the issued subject instead", l.OriginSeq, err)
		}
		if copyMsg.Subject != topo.ConflictSubject() {
			return 0, fmt.Errorf("message %d is on %s, not the conflict subject", l.OriginSeq, copyMsg.Subject)
		}
		seq, err := strconv.ParseUint(copyMsg.Header.Get(events.HeaderOriginSeq), 10, 64)
		if err != nil || seq == 0 {
			return 0, fmt.Errorf("conflict copy %d has no valid %s header", l.OriginSeq, events.HeaderOriginSeq)
		}
		return seq, nil
	}
	return 0, fmt.Errorf("origin subject %q is neither %s nor %s", l.OriginSubject, topo.IssuedFilter(), topo.ConflictSubject())
}
