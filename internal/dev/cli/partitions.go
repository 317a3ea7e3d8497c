package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
)

// partitionLayouts are today's shared consumer at two pool sizes, and one
// writer per partition for 1, 2 and 4 partitions.
var partitionLayouts = []bench.Layout{
	{Name: "shared, 2 workers", Partitions: 1, Workers: 2},
	{Name: "shared, 4 workers", Partitions: 1, Workers: 4},
	{Name: "1 partition", Partitions: 1, Workers: 1},
	{Name: "2 partitions", Partitions: 2},
	{Name: "4 partitions", Partitions: 4},
}

func runPartitions(ctx context.Context, cfg *app.Common, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench partitions", flag.ContinueOnError)
	fs.SetOutput(stderr)
	n := fs.Int("events", 50000, "tokens per drain")
	keys := fs.Int("keys", 5000, "distinct keys the tokens are spread over (each key issued events/keys times)")
	batch := fs.Int("batch", 1000, "events per batch")
	runs := fs.Int("runs", 3, "runs of every layout; medians are reported")
	if err := fs.Parse(args); err != nil {
		return app.HelpIsNil(app.FlagErr(err))
	}
	if *n < 1 || *keys < 1 || *keys > *n || *batch < 1 || *runs < 1 {
		return fmt.Errorf("bench partitions: need 1 <= keys <= events, batch >= 1, runs >= 1")
	}
	// Recovery logs every deactivation at info: thousands per drain.
	quiet := *cfg
	if quiet.LogLevel == "info" {
		quiet.LogLevel = "warn"
	}
	log := app.NewLogger(&quiet, stderr)
	pool, closeScratch, err := migratedScratch(ctx, cfg, 12)
	if err != nil {
		return err
	}
	defer closeScratch()
	nc, _, err := app.ConnectNATS(cfg, "tokenpipe-bench", log, nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	// Fill keeps 4,096 publishes in flight; the default limit is 4,000, and
	// on a busy machine the 200 ms stall allowance runs out.
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
	if err != nil {
		return err
	}
	topo := cfg.Topology()
	id := app.RandomID()
	topo.Stream, topo.Prefix = "TPPART_"+strings.ToUpper(id), "tppart."+id
	res, err := bench.Partitions(ctx, pool, js, bench.PartitionsOptions{
		Events: *n, Keys: *keys, BatchSize: *batch, Runs: *runs, Layouts: partitionLayouts,
		Topology: topo, Progress: stderr, Log: log.With("component", "bench"),
	})
	if err != nil {
		return err
	}
	writePartitionsTable(stdout, res)
	return nil
}

func writePartitionsTable(w io.Writer, res *bench.PartitionsResult) {
	o := res.Options
	fmt.Fprintf(w, "partitioned persisters: %d tokens over %d keys (each key issued %d times, random order), batch %d, "+
		"persisters and recovery in one process, %d runs, median [min-max]\n\n", o.Events, o.Keys, o.Events/o.Keys, o.BatchSize, o.Runs)
	fmt.Fprintln(w, "| layout | writers | rows/s, persisters done | rows/s, conflicts resolved too | conflicts to recovery | deadlock retries | other retries |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for i, l := range o.Layouts {
		per := res.Median(i, func(r bench.PartitionsRun) float64 { return r.PersistedPerSec })
		rate := res.Median(i, func(r bench.PartitionsRun) float64 { return r.RowsPerSec })
		conf := res.Median(i, func(r bench.PartitionsRun) float64 { return r.Conflicts })
		dead := res.Median(i, func(r bench.PartitionsRun) float64 { return r.Deadlocks })
		other := res.Median(i, func(r bench.PartitionsRun) float64 { return r.Retries })
		fmt.Fprintf(w, "| %s | %d | %.0f [%.0f-%.0f] | %.0f [%.0f-%.0f] | %.0f [%.0f-%.0f] | %.0f [%.0f-%.0f] | %.0f [%.0f-%.0f] |\n", l.Name, l.Writers(),
			per.Median, per.Min, per.Max, rate.Median, rate.Min, rate.Max, conf.Median, conf.Min, conf.Max, dead.Median, dead.Min, dead.Max, other.Median, other.Min, other.Max)
	}
	fmt.Fprintln(w, "\nshared: today's one consumer with N workers; partitions: TOKENPIPE_PARTITIONS=N, one writer per partition."+
		"\nrows/s, persisters done: until every event has its row or waits on the conflict subject; conflicts resolved too:"+
		" until recovery's consumer is empty as well. Every run's table is checked"+
		" (one row per token, one ACTIVE per key, the newest).")
}
