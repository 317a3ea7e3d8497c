package e2e

import (
	"fmt"
	"net/http"
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
	// Outside the ephemeral range, so the port is still free for the restart.
	s := &natsServer{t: t, port: serverPort(t), dir: t.TempDir()}
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
	s.kill()
	time.Sleep(down)
	s.run(s.cmd.Path)
}

// kill stops the server with SIGKILL; run(s.cmd.Path) starts it again.
func (s *natsServer) kill() {
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	_ = s.cmd.Wait()
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

// TestIssuerRefusesWhileNATSUnreachable kills the only NATS server under an
// issuer taking steady load, keeps it down, and starts it again on its
// store. While it is down the issuer must hand out no token (its event
// cannot be stored): requests get a quick 503 and readiness fails, so a load
// balancer stops sending. Afterwards the issuer, persister and recovery
// reconnect by themselves and every token that did get a 200 has its row.
func TestIssuerRefusesWhileNATSUnreachable(t *testing.T) {
	t.Parallel()
	const rate, down = 200, 6 * time.Second
	srv := startNATS(t)
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStreamAt(t, srv.url())
	addClient(t, pool, "down-app", "down-secret", "a", "b", "c", "d")
	// Acks the killed server never received come back after the ack wait.
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_ACK_WAIT=5s")
	d.env = append(d.env, "TOKENPIPE_NATS_URL="+srv.url())
	iss, tokenURL := d.issuer("issuer")
	d.start("persister", "persister")
	d.start("recovery", "recovery")
	load := startLoad(t, rate, "down-app", "down-secret", []string{"a", "b", "c", "d"}, tokenURL)
	time.Sleep(3 * time.Second)

	faultStart := time.Now()
	srv.kill()
	testenv.Eventually(t, down, "issuer not ready while NATS is down", func() (bool, error) {
		resp, err := http.Get("http://" + iss.opsAddr + "/readyz")
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable, nil
	})
	time.Sleep(time.Until(faultStart.Add(down)))
	srv.run(srv.cmd.Path)
	faultEnd := time.Now()
	testenv.Eventually(t, time.Minute, "tokens issued again", func() (bool, error) {
		for _, s := range load.requests() {
			if s.sent.After(faultEnd) && s.code == http.StatusOK {
				return true, nil
			}
		}
		return false, nil
	})
	time.Sleep(2 * time.Second)
	digests, _ := load.finish()
	reqs := load.requests()
	// A request sent once the kill was seen and answered before the server
	// was back (and before a publish timeout could reach past it) cannot
	// have had its event stored.
	refused, firstOK := 0, time.Duration(-1)
	for _, s := range reqs {
		answered := s.sent.Add(s.took)
		if s.sent.After(faultStart.Add(time.Second)) && answered.Before(faultEnd) {
			if s.code == http.StatusOK {
				t.Fatalf("a request sent %s after NATS was killed got a token while it was down", s.sent.Sub(faultStart))
			}
			refused++
		}
		if s.sent.After(faultEnd) && s.code == http.StatusOK && (firstOK < 0 || answered.Sub(faultEnd) < firstOK) {
			firstOK = answered.Sub(faultEnd)
		}
	}
	if refused == 0 {
		t.Fatal("no request was sent while NATS was down; the test proved nothing")
	}
	name := fmt.Sprintf("NATS unreachable under the issuer: only server SIGKILL, down %s, %d req/s", down, rate)
	rep := auditUntilClean(t, name, len(reqs), digests, pool, js, topo, time.Now())
	f := summarize(reqs, faultStart, faultEnd)
	t.Logf("NATSHA|%s|%d|%d|%s|%d|%s / %s|-|-|%d / %d / %d|single server (machine's nats-server); readiness failed while down; first token %s after the restart",
		name, len(reqs), f.ok, f.unavailableText(), f.other, f.p99Before, f.p99During,
		len(rep.Missing), len(rep.Duplicated), len(rep.DoubleActive), firstOK.Round(10*time.Millisecond))
}
