package e2e

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/schema"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// pgCluster is a Postgres cluster of the test's own (initdb in a temporary
// directory, started with pg_ctl), so the test may stop and restart it.
type pgCluster struct {
	t      testing.TB
	bin    string
	dir    string
	port   int
	as     []string // command prefix to run as the postgres user when we are root
	opts   []string // extra server settings (-c name=value)
	fsync  bool     // keep fsync on (benchmarks); tests turn it off for speed
	killed bool     // SIGKILLed by the test: nothing to stop
}

func startPostgres(t *testing.T) *pgCluster {
	t.Helper()
	c := newPGDir(t)
	c.run("initdb", "-D", c.dir, "-A", "trust", "-U", "postgres", "--no-sync")
	c.start()
	t.Cleanup(c.shutdown)
	return c
}

// newPGDir picks the tools, a temporary directory owned by the user the
// server runs as, and a free port, for a cluster not created yet.
func newPGDir(t testing.TB) *pgCluster {
	t.Helper()
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(bins) == 0 {
		t.Skip("initdb not installed")
	}
	c := &pgCluster{t: t, bin: filepath.Dir(bins[len(bins)-1])}
	base, err := os.MkdirTemp("", "tokenpipe-pg-")
	testenv.Must(t, err, "temp dir")
	t.Cleanup(func() { os.RemoveAll(base) })
	c.dir = filepath.Join(base, "data")
	if os.Geteuid() == 0 {
		// initdb refuses to run as root.
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Skip("running as root without a postgres user")
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		testenv.Must(t, os.Chown(base, uid, gid), "chown")
		c.as = []string{"runuser", "-u", "postgres", "--"}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "port")
	c.port = ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return c
}

// shutdown stops the server at the end of the test unless the test killed it.
func (c *pgCluster) shutdown() {
	if !c.killed {
		c.run("pg_ctl", "-D", c.dir, "-m", "immediate", "stop")
	}
}

func (c *pgCluster) run(tool string, args ...string) {
	c.t.Helper()
	argv := append(append(append([]string{}, c.as...), filepath.Join(c.bin, tool)), args...)
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		c.t.Fatalf("%s: %v\n%s", tool, err, out)
	}
}

func (c *pgCluster) start() {
	c.t.Helper()
	o := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1", c.port, filepath.Dir(c.dir))
	if !c.fsync {
		o += " -c fsync=off"
	}
	for _, opt := range c.opts {
		o += " -c " + opt
	}
	c.run("pg_ctl", "-D", c.dir, "-w", "-l", filepath.Join(filepath.Dir(c.dir), "log"), "-o", o, "start")
}

// stop shuts the server down fast: open connections are cut.
func (c *pgCluster) stop() { c.run("pg_ctl", "-D", c.dir, "-m", "fast", "-w", "stop") }

func (c *pgCluster) url() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
}

// TestPostgresOutageDelaysButLosesNothing stops Postgres for a while under a
// draining persister: batches fail, are retried and handed back; once the
// database is back the backlog drains and the audit is clean.
func TestPostgresOutageDelaysButLosesNothing(t *testing.T) {
	t.Parallel()
	pg := startPostgres(t)
	ctx := ctxT(t, 4*time.Minute)
	pool, err := pgxpool.New(ctx, pg.url())
	testenv.Must(t, err, "pool")
	defer pool.Close()
	_, err = schema.Up(ctx, pool)
	testenv.Must(t, err, "migrate")
	_, js, topo := testenv.JetStream(t)
	evs := bench.MakeEvents(20000)

	outage := 10 * time.Second
	if d := os.Getenv("TOKENPIPE_TEST_PG_OUTAGE"); d != "" {
		outage, err = time.ParseDuration(d)
		testenv.Must(t, err, "TOKENPIPE_TEST_PG_OUTAGE")
	}
	addClient(t, pool, "outage-app", "outage-secret", "a", "b", "c", "d")
	d := newDeployment(t, pg.url(), topo, "TOKENPIPE_BATCH_SIZE=500", "TOKENPIPE_RETRY_MAX_ELAPSED=5s", "TOKENPIPE_NAK_DELAY=1s")
	iss, tokenURL := d.issuer("issuer")
	d.start("persister", "persister")
	d.start("recovery", "recovery")
	// HTTP load through the issuer the whole time, plus a backlog published
	// straight to the stream.
	load := startLoad(t, 200, "outage-app", "outage-secret", []string{"a", "b", "c", "d"}, tokenURL)
	testenv.Must(t, bench.Fill(ctx, js, topo, evs[:10000], nil), "fill before outage")
	time.Sleep(500 * time.Millisecond)
	pg.stop()
	before := load.sent.Load()
	testenv.Must(t, bench.Fill(ctx, js, topo, evs[10000:], nil), "fill during outage")
	time.Sleep(outage)
	resp, err := http.Get("http://" + iss.opsAddr + "/readyz")
	testenv.Must(t, err, "readyz during outage")
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("async issuer not ready during a database outage: %d", resp.StatusCode)
	}
	issuedDuring := load.sent.Load() - before
	pg.start()
	start := time.Now()
	time.Sleep(500 * time.Millisecond)
	httpDigests, errs := load.finish()
	if len(errs) > 0 {
		t.Fatalf("the async issuer refused requests during the database outage: %v", errs)
	}
	t.Logf("%d requests answered during the %s outage, %d tokens over the whole run", issuedDuring, outage, len(httpDigests))

	digests := make([]events.Digest, len(evs))
	for i, e := range evs {
		digests[i] = e.TokenDigest
	}
	digests = append(digests, httpDigests...)
	auditUntilClean(t, fmt.Sprintf("Postgres down %s under 200 req/s + 20k published events", outage), int(load.sent.Load())+len(evs), digests, pool, js, topo, start)
}
