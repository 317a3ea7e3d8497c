package cli

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestBenchRolesProcesses builds the development binary and runs a short
// bench roles: issuer, persister and recovery as child processes against the
// machine's Postgres and NATS. Every role must get a row with a figure, and
// the scratch database and stream must be gone afterwards.
func TestBenchRolesProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := buildDev(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "bench", "roles", "-rate", "200", "-duration", "2s", "-warmup", "1s", "-runs", "1")
	cmd.Env = append(os.Environ(),
		"TOKENPIPE_DATABASE_URL="+testenv.AdminDatabaseURL(),
		"TOKENPIPE_NATS_URL="+testenv.NATSURL(),
		"TOKENPIPE_DB_MAX_CONNS=3") // the roles inherit it: the suite shares the server's connection limit
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("bench roles: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	out := stdout.String()
	t.Logf("\n%s", out)

	// Recovery does little per token (no conflicts here): in 400 tokens its
	// share may round to zero clock ticks, so only its row is required.
	for role, mustBePositive := range map[string]bool{
		"issuer": true, "persister": true, "recovery": false, "nats-server": true,
		"load generator (this process)": true, "Postgres (backends of the scratch database)": true,
	} {
		m := regexp.MustCompile(`(?m)^\| ` + regexp.QuoteMeta(role) + ` \| ([0-9]+) \[`).FindStringSubmatch(out)
		if m == nil {
			t.Errorf("no measured row for %s", role)
			continue
		}
		if v, _ := strconv.Atoi(m[1]); mustBePositive && v <= 0 {
			t.Errorf("%s: %d µs per token, want a positive figure", role, v)
		}
	}
	for _, want := range []string{"NATS server 2.", "PostgreSQL 1", "failed requests 0, unpersisted tokens 0"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}

	db := regexp.MustCompile(`tokenpipe_scratch_[0-9a-f]+`).FindString(stderr.String())
	stream := regexp.MustCompile(`stream (TPROLES_[0-9A-F]+)`).FindStringSubmatch(stderr.String())
	if db == "" || stream == nil {
		t.Fatalf("no scratch database or stream named in stderr:\n%s", stderr.String())
	}
	conn, err := pgx.Connect(ctx, testenv.AdminDatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_database WHERE datname = $1", db).Scan(&n); err != nil || n != 0 {
		t.Errorf("scratch database %s still exists (count %d, err %v)", db, n, err)
	}
	nc, err := nats.Connect(testenv.NATSURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Stream(ctx, stream[1]); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Errorf("scratch stream %s: %v, want it removed", stream[1], err)
	}
}

// TestBenchRolesHelpDoesNotRun: -h prints the flags and returns without
// starting anything (it once went on to run the whole benchmark).
func TestBenchRolesHelpDoesNotRun(t *testing.T) {
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// An unreachable database: a benchmark that starts fails on it.
	t.Setenv("TOKENPIPE_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none?sslmode=disable&connect_timeout=1")
	err := runBench(ctx, []string{"roles", "-h"}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("bench roles -h: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "-rate") || stdout.Len() != 0 {
		t.Fatalf("bench roles -h: stdout %q, stderr %q; want the flags on stderr only", stdout.String(), stderr.String())
	}
	err = runBench(ctx, []string{"roles", "-rate", "0"}, &stdout, &stderr)
	if !errors.Is(err, app.ErrUsage) {
		t.Fatalf("bench roles -rate 0: %v, want a usage error", err)
	}
}
