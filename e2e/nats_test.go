package e2e

import (
	"fmt"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// natsServer is a nats-server process of the test's own, so the test may
// kill and restart it. Its store directory survives restarts.
type natsServer struct {
	t    *testing.T
	port int
	dir  string
	cmd  *exec.Cmd
}

func startNATS(t *testing.T) *natsServer {
	t.Helper()
	path, err := exec.LookPath("nats-server")
	if err != nil {
		if path, err = exec.LookPath("/usr/sbin/nats-server"); err != nil {
			t.Skip("nats-server binary not installed")
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "free port")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	s := &natsServer{t: t, port: port, dir: t.TempDir()}
	s.run(path)
	t.Cleanup(func() {
		if s.cmd != nil {
			_ = s.cmd.Process.Kill()
			_ = s.cmd.Wait()
		}
	})
	return s
}

func (s *natsServer) url() string { return fmt.Sprintf("nats://127.0.0.1:%d", s.port) }

func (s *natsServer) run(path string) {
	s.t.Helper()
	s.cmd = exec.Command(path, "-a", "127.0.0.1", "-p", fmt.Sprint(s.port), "-js", "-sd", s.dir)
	testenv.Must(s.t, s.cmd.Start(), "start nats-server")
	testenv.Eventually(s.t, 15*time.Second, "nats-server up", func() (bool, error) {
		nc, err := nats.Connect(s.url())
		if err != nil {
			return false, nil
		}
		defer nc.Close()
		js, _ := jetstream.New(nc)
		_, err = js.AccountInfo(ctxT(s.t, 2*time.Second))
		return err == nil, nil
	})
}

// restart kills the server (SIGKILL, no flush) and starts it again on the
// same port and store after down.
func (s *natsServer) restart(down time.Duration) {
	s.t.Helper()
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	_ = s.cmd.Wait()
	time.Sleep(down)
	s.run(s.cmd.Path)
}

// TestPersisterSurvivesNATSRestart restarts NATS twice while a persister
// process drains; the persister reconnects by itself and the audit is clean.
func TestPersisterSurvivesNATSRestart(t *testing.T) {
	t.Parallel()
	srv := startNATS(t)
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStreamAt(t, srv.url())
	ctx := ctxT(t, 3*time.Minute)
	evs := bench.MakeEvents(30000)
	testenv.Must(t, bench.Fill(ctx, js, topo, evs, nil), "fill")

	d := newDeployment(t, dbURL, topo, "TOKENPIPE_ACK_WAIT=3s", "TOKENPIPE_BATCH_SIZE=500")
	d.env = append(d.env, "TOKENPIPE_NATS_URL="+srv.url())
	p := d.start("persister", "persister")
	d.start("recovery", "recovery")
	count := func() int {
		var n int
		testenv.Must(t, pool.QueryRow(ctx, "SELECT count(*) FROM tokens").Scan(&n), "count")
		return n
	}
	for i := 0; i < 2; i++ {
		before := count()
		testenv.Eventually(t, 60*time.Second, "progress", func() (bool, error) { return count() >= before+2000, nil })
		srv.restart(time.Second)
	}
	digests := make([]events.Digest, len(evs))
	for i, e := range evs {
		digests[i] = e.TokenDigest
	}
	auditUntilClean(t, "NATS server SIGKILL + restart x2 (stream of 30k events)", len(evs), digests, pool, js, topo, time.Now())
	if !strings.Contains(p.output(), "nats reconnected") {
		t.Fatalf("persister log does not show the reconnect:\n%s", p.output())
	}
}
