package persister_test

import (
	"context"
	"testing"

	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/persister"
)

// BenchmarkWriteBatch measures the persister's database path alone (no NATS)
// against raw COPY of the same rows into the same table, in the same run:
//
//	go test -run '^$' -bench WriteBatch -benchtime 20x ./persister/
func BenchmarkWriteBatch(b *testing.B) {
	_, pool := testenv.Database(b)
	ctx := context.Background()
	const batch = 1000
	for _, mode := range []string{"copy-ceiling", "writebatch"} {
		b.Run(mode, func(b *testing.B) {
			evs := bench.MakeEvents(batch * b.N)
			_, err := pool.Exec(ctx, "TRUNCATE tokens")
			testenv.Must(b, err, "truncate")
			b.ResetTimer()
			if mode == "copy-ceiling" {
				_, err := bench.CopyCeiling(ctx, pool, evs, 1, batch)
				testenv.Must(b, err, "copy")
			} else {
				for i := 0; i < len(evs); i += batch {
					rows := make([]persister.Row, batch)
					for j := range rows {
						rows[j] = persister.Row{Event: evs[i+j], Seq: uint64(i + j + 1)}
					}
					_, err := persister.WriteBatch(ctx, pool, rows)
					testenv.Must(b, err, "write batch")
				}
			}
			b.ReportMetric(float64(len(evs))/b.Elapsed().Seconds(), "rows/s")
		})
	}
}
