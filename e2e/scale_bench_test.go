package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

var (
	plainOnce   sync.Once
	plainBinary string
	plainErr    error
)

// benchBinary builds tokenpipe without the race detector, once: the tests'
// binary has it, which would distort a measurement.
func benchBinary(b *testing.B) string {
	plainOnce.Do(func() {
		plainBinary = filepath.Join(filepath.Dir(binary), "tokenpipe-plain")
		cmd := exec.Command("go", "build", "-o", plainBinary, "../cmd/tokenpipe")
		cmd.Stderr = os.Stderr
		plainErr = cmd.Run()
	})
	if plainErr != nil {
		b.Fatalf("build: %v", plainErr)
	}
	return plainBinary
}

// BenchmarkDrainByPersisterProcesses is the scaling curve: a full stream
// drained by 1, 2 and 4 persister processes (2 workers each) on this machine.
//
//	go test -run '^$' -bench DrainByPersisterProcesses -benchtime 1x -count 3 ./e2e/
func BenchmarkDrainByPersisterProcesses(b *testing.B) {
	const events = 100000
	for _, procs := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("procs=%d", procs), func(b *testing.B) {
			for range b.N {
				b.StopTimer()
				dbURL, pool := testenv.Database(b)
				_, js, topo := testenv.JetStream(b)
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
				defer cancel()
				testenv.Must(b, bench.Fill(ctx, js, topo, bench.MakeEvents(events), nil), "fill")
				cons, err := js.Consumer(ctx, topo.Stream, topo.Persister)
				testenv.Must(b, err, "consumer")
				var cmds []*exec.Cmd
				b.StartTimer()
				start := time.Now()
				for i := range procs {
					cmd := exec.Command(benchBinary(b), "persister")
					cmd.Env = append(os.Environ(), "TOKENPIPE_DATABASE_URL="+dbURL, "TOKENPIPE_NATS_URL="+testenv.NATSURL(),
						"TOKENPIPE_STREAM="+topo.Stream, "TOKENPIPE_SUBJECT_PREFIX="+topo.Prefix,
						"TOKENPIPE_OPS_ADDR=", "TOKENPIPE_LOG_LEVEL=warn", fmt.Sprintf("TOKENPIPE_INSTANCE=p%d", i))
					testenv.Must(b, cmd.Start(), "start persister")
					cmds = append(cmds, cmd)
				}
				for {
					info, err := cons.Info(ctx)
					testenv.Must(b, err, "info")
					if info.NumPending == 0 && info.NumAckPending == 0 && info.AckFloor.Stream >= events {
						break
					}
					time.Sleep(25 * time.Millisecond)
				}
				elapsed := time.Since(start)
				b.StopTimer()
				for _, c := range cmds {
					_ = c.Process.Kill()
					_ = c.Wait()
				}
				var rows int
				testenv.Must(b, pool.QueryRow(ctx, "SELECT count(*) FROM tokens").Scan(&rows), "count")
				if rows != events {
					b.Fatalf("rows = %d, want %d", rows, events)
				}
				b.ReportMetric(float64(events)/elapsed.Seconds(), "rows/s")
			}
		})
	}
}
