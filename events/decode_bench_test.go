package events_test

import (
	"testing"

	"github.com/tokenpipe/tokenpipe/events"
)

// BenchmarkDecodeTokenIssued: the persister decodes every event; on a shared
// 2-core machine its CPU comes out of the database's share.
func BenchmarkDecodeTokenIssued(b *testing.B) {
	body, _ := events.EncodeTokenIssued(valid())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := events.DecodeTokenIssued(body); err != nil {
			b.Fatal(err)
		}
	}
}
