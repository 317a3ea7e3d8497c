package cli

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// tinyE2E is a bench e2e small enough for a test: every scenario runs, on
// a few hundred tokens.
var tinyE2E = []string{"bench", "e2e", "-runs", "1", "-rate", "200", "-duration", "1s", "-warmup", "0s", "-idle", "1s",
	"-ramp-start", "200", "-ramp-step", "200", "-ramp-max", "400", "-step-duration", "1s", "-preload", "2000", "-drain-events", "2000"}

// TestBenchE2EProcesses runs a tiny bench e2e (the benchmark of make
// bench) against the machine's Postgres and NATS: the report must have
// every scenario's row and every role's cost at the fixed rate, land
// between the markers of the -write file without touching the rest, and
// every scratch database and stream must be gone afterwards. No figure is
// judged: the machine is shared.
func TestBenchE2EProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := buildDev(t)
	doc := filepath.Join(t.TempDir(), "BENCHMARKS.md")
	before, after := "# Benchmarks\n\nhand-written above\n\n", "\n\nhand-written below\n"
	if err := os.WriteFile(doc, []byte(before+beginMark+"\nold figures\n"+endMark+after), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr := runBin(t, bin, append(tinyE2E, "-write", doc)...)
	t.Logf("\n%s", stdout)

	for _, want := range []string{
		"| highest rate with p99 issue-to-persisted lag <= 250ms | ",
		"| conflict-heavy mix (30% re-issue, 5% simultaneous duplicates, coalescing off) | ",
		"| sync mode (the issuer writes the row in the request) | ",
		"| table already holding 2000 rows | ",
		"| persister drain from a full stream (2000 events, 2 workers) | ",
		"PostgreSQL 1", "nats-server 2.", "the machine's server",
		"At 200 tokens/s: achieved",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	// Every role has a figure at the fixed rate; the roles an idle cost.
	for _, role := range []string{"issuer", "persister", "recovery", "nats-server", "load generator (this process)", pgRole} {
		m := regexp.MustCompile(`(?m)^\| ` + regexp.QuoteMeta(role) + ` \| [^|]+ \| [0-9]+ \[`).FindString(stdout)
		if m == "" {
			t.Errorf("no cost at the fixed rate for %s", role)
		}
	}
	if n := len(regexp.MustCompile(`(?m)^\| (issuer|persister|recovery) \|.*\| [0-9.]+ \[[0-9.]+-[0-9.]+\] \| (met|\*\*missed\*\*) \|$`).FindAllString(stdout, -1)); n != 3 {
		t.Errorf("%d roles with an idle cost and verdict, want 3", n)
	}
	written, err := os.ReadFile(doc)
	if err != nil {
		t.Fatal(err)
	}
	if want := before + beginMark + "\n" + stdout + endMark + after; string(written) != want {
		t.Errorf("-write file:\n%s\nwant:\n%s", written, want)
	}
	assertScratchGone(t, stderr)
}

// TestBenchE2EModuleNATS: -nats-server module runs the roles against a
// nats-server process built from the module, and the report names it.
func TestBenchE2EModuleNATS(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	stdout, stderr := runBin(t, buildDev(t), append(slices.Clone(tinyE2E), "-nats-server", "module", "-scenarios", "", "-idle", "0s")...)
	if !strings.Contains(stdout, "a process built from the nats-server/v2 module") {
		t.Errorf("report does not name the module's server:\n%s", stdout)
	}
	if !regexp.MustCompile(`(?m)^\| nats-server \| <= 40 \| [0-9]+ \[`).MatchString(stdout) {
		t.Errorf("no nats-server cost:\n%s", stdout)
	}
	for _, absent := range []string{"conflict-heavy", "persister drain"} {
		if strings.Contains(stdout, absent) {
			t.Errorf("report has %q though -scenarios was empty", absent)
		}
	}
	assertScratchGone(t, stderr)
}

func runBin(t *testing.T, bin string, args ...string) (string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(),
		"TOKENPIPE_DATABASE_URL="+testenv.AdminDatabaseURL(),
		"TOKENPIPE_NATS_URL="+testenv.NATSURL(),
		// The roles inherit it: a few connections each, as the suite's
		// other packages share the server's connection limit.
		"TOKENPIPE_DB_MAX_CONNS=3")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), stderr.String()
}

// assertScratchGone checks that every scratch database and every stream
// on the machine's server that the run named on stderr was removed.
func assertScratchGone(t *testing.T, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dbs := regexp.MustCompile(`tokenpipe_scratch_[0-9a-f]+`).FindAllString(stderr, -1)
	if len(dbs) == 0 {
		t.Fatalf("no scratch database named in stderr:\n%s", stderr)
	}
	conn, err := pgx.Connect(ctx, testenv.AdminDatabaseURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_database WHERE datname = ANY($1)", dbs).Scan(&n); err != nil || n != 0 {
		t.Errorf("%d of the scratch databases %v still exist (err %v)", n, dbs, err)
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
	for _, s := range regexp.MustCompile(`stream (TP[A-Z]+_[0-9A-F]+)`).FindAllStringSubmatch(stderr, -1) {
		if _, err := js.Stream(ctx, s[1]); !errors.Is(err, jetstream.ErrStreamNotFound) {
			t.Errorf("scratch stream %s: %v, want it removed", s[1], err)
		}
	}
}

// TestBenchE2EFlags: -h prints the flags without running anything, and bad
// flags are usage errors before anything starts.
func TestBenchE2EFlags(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// An unreachable database: a benchmark that starts fails on it.
	t.Setenv("TOKENPIPE_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none?sslmode=disable&connect_timeout=1")
	var stdout, stderr bytes.Buffer
	if err := runBench(ctx, []string{"e2e", "-h"}, &stdout, &stderr); err != nil {
		t.Fatalf("bench e2e -h: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "-ramp-step") || stdout.Len() != 0 {
		t.Fatalf("bench e2e -h: stdout %q, stderr %q; want the flags on stderr only", stdout.String(), stderr.String())
	}
	for _, args := range [][]string{
		{"-runs", "0"}, {"-rate", "-1"}, {"-ramp-max", "100"}, {"-ramp-step", "0"}, {"-lag-bound", "0s"},
		{"-scenarios", "conflict,bogus"}, {"-nats-server", "elsewhere"}, {"-drain-events", "0"}, {"-idle", "-1s"},
	} {
		stderr.Reset()
		err := runBench(ctx, append([]string{"e2e"}, args...), &stdout, &stderr)
		if !errors.Is(err, app.ErrUsage) {
			t.Errorf("bench e2e %v: %v, want a usage error", args, err)
		}
		if !strings.Contains(stderr.String(), "bench e2e:") {
			t.Errorf("bench e2e %v: stderr %q names no rule", args, stderr.String())
		}
	}
}

// TestWriteSection: a report replaces only its own section; without its
// markers it is appended with them, so the next run finds it.
func TestWriteSection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "B.md")
	doc := "intro\n" + beginMark + "\nold e2e\n" + endMark + "\nmiddle\n"
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeSection(path, matrixBegin, matrixEnd, "matrix 1\n"); err != nil {
		t.Fatal(err)
	}
	if err := writeSection(path, matrixBegin, matrixEnd, "matrix 2\n"); err != nil {
		t.Fatal(err)
	}
	if err := writeSection(path, beginMark, endMark, "new e2e\n"); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := "intro\n" + beginMark + "\nnew e2e\n" + endMark + "\nmiddle\n\n" + matrixBegin + "\nmatrix 2\n" + matrixEnd + "\n"
	if string(got) != want {
		t.Fatalf("file:\n%s\nwant:\n%s", got, want)
	}
}
