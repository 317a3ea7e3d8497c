package stream

import (
	"errors"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func TestStatusMessagesAreTheServersOnly(t *testing.T) {
	hdr := func(code string) nats.Header { return nats.Header{"Status": []string{code}} }
	for _, c := range []struct {
		name string
		m    *nats.Msg
		want bool
	}{
		{"end marker", &nats.Msg{Subject: "_INBOX.x.1", Header: hdr("404")}, true},
		{"stream message with a payload", &nats.Msg{Data: []byte("x"), Reply: "$JS.ACK.s.c.1.1.1.1.0", Header: hdr("404")}, false},
		// A stored event with an empty body and a header named Status is
		// still an event: it has an ack subject.
		{"stream message without payload", &nats.Msg{Reply: "$JS.ACK.s.c.1.1.1.1.0", Header: hdr("404")}, false},
		{"no headers", &nats.Msg{Subject: "_INBOX.x.1"}, false},
	} {
		if _, got := status(c.m); got != c.want {
			t.Errorf("%s: status = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestEndOfRequest(t *testing.T) {
	for _, c := range []struct {
		code, description string
		want              error // nil: a normal end
		fails             bool
	}{
		{"404", "No Messages", nil, false},
		{"408", "Request Timeout", nil, false},
		{"409", "Leadership Change", nil, false},
		{"409", "Server Shutdown", nil, false},
		{"409", "Consumer Deleted", jetstream.ErrConsumerDeleted, true},
		{"409", "Exceeded MaxRequestBatch of 100", nil, true},
		{"400", "Bad Request", nil, true},
	} {
		err := endOfRequest(c.code, c.description)
		if (err != nil) != c.fails || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("%s %s: %v", c.code, c.description, err)
		}
	}
}
