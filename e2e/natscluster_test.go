package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// natsServerBinary is the nats-server main package of the nats-server/v2
// module go.mod pins, built once per test binary: a current server as
// production runs it (signals, lame duck, clustering), whatever nats-server
// the machine has installed.
var natsServerBinary struct {
	once sync.Once
	path string
	err  error
}

func moduleNATSServer(t *testing.T) string {
	t.Helper()
	natsServerBinary.once.Do(func() {
		path := filepath.Join(filepath.Dir(binary), "nats-server")
		out, err := exec.Command("go", "build", "-o", path, "github.com/nats-io/nats-server/v2").CombinedOutput()
		if err != nil {
			natsServerBinary.err = fmt.Errorf("build nats-server from the module: %v\n%s", err, out)
			return
		}
		natsServerBinary.path = path
	})
	if natsServerBinary.err != nil {
		t.Fatal(natsServerBinary.err)
	}
	return natsServerBinary.path
}

// natsNode is one server of a natsCluster; its store survives restarts.
type natsNode struct {
	name        string
	port        int
	clusterPort int
	conf        string
	logFile     string
	cmd         *exec.Cmd
	done        chan error
}

func (n *natsNode) url() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.port) }

// running reports whether the node's process is up (started and not exited).
func (n *natsNode) running() bool {
	if n.cmd == nil {
		return false
	}
	select {
	case err := <-n.done:
		n.done <- err
		return false
	default:
		return true
	}
}

// natsCluster is three nats-server processes of the test's own, routed to
// each other over loopback, with JetStream; the test may kill and restart
// them.
type natsCluster struct {
	t     *testing.T
	bin   string
	nodes []*natsNode
}

// Lame duck: the server hands its Raft leaderships to the others, stops
// JetStream, waits the grace period, then closes its clients spread over
// the duration (at most a second apart), so they reconnect to the other
// servers a few at a time; it exits when the last is closed. 30 s is the
// shortest duration the server accepts.
const (
	lameDuckDuration = 30 * time.Second
	lameDuckGrace    = 2 * time.Second
)

func startNATSCluster(t *testing.T) *natsCluster {
	t.Helper()
	c := &natsCluster{t: t, bin: moduleNATSServer(t)}
	dir := t.TempDir()
	for i := range 3 {
		c.nodes = append(c.nodes, &natsNode{name: fmt.Sprintf("n%d", i+1), port: serverPort(t), clusterPort: serverPort(t)})
	}
	var routes []string
	for _, n := range c.nodes {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", n.clusterPort))
	}
	for _, n := range c.nodes {
		store := filepath.Join(dir, n.name)
		n.conf = filepath.Join(dir, n.name+".conf")
		n.logFile = filepath.Join(dir, n.name+".log")
		conf := fmt.Sprintf(`server_name: %s
listen: 127.0.0.1:%d
jetstream { store_dir: %q }
cluster {
  name: tokenpipe-test
  listen: 127.0.0.1:%d
  routes: [%s]
}
lame_duck_duration: "%s"
lame_duck_grace_period: "%s"
`, n.name, n.port, store, n.clusterPort, strings.Join(routes, ", "), lameDuckDuration, lameDuckGrace)
		testenv.Must(t, os.WriteFile(n.conf, []byte(conf), 0o600), "write nats config")
	}
	t.Cleanup(func() {
		for _, n := range c.nodes {
			if n.running() {
				_ = n.cmd.Process.Kill()
				<-n.done
			}
			if t.Failed() {
				out, _ := os.ReadFile(n.logFile)
				t.Logf("--- log of nats-server %s (last 4 KiB) ---\n%s", n.name, tail(out, 4096))
			}
		}
	})
	for _, n := range c.nodes {
		c.run(n)
	}
	c.waitJetStream(c.nodes...)
	return c
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// serverPort finds a free port below the kernel's ephemeral range (32768 and
// up on Linux). A killed server's port must still be free when it restarts:
// ports the other tests take with ":0", and the source ports of every
// outgoing connection, come from the ephemeral range, so they never take it.
func serverPort(t *testing.T) int {
	t.Helper()
	for range 200 {
		port := 20000 + rand.IntN(12000)
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			ln.Close()
			return port
		}
	}
	t.Fatal("no free port between 20000 and 32000")
	return 0
}

// run starts n's process (a new one after a kill or a lame-duck exit).
func (c *natsCluster) run(n *natsNode) {
	c.t.Helper()
	logf, err := os.OpenFile(n.logFile, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	testenv.Must(c.t, err, "nats log")
	defer logf.Close()
	n.cmd = exec.Command(c.bin, "-c", n.conf)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	testenv.Must(c.t, n.cmd.Start(), "start nats-server "+n.name)
	n.done = make(chan error, 1)
	go func(cmd *exec.Cmd, done chan error) { done <- cmd.Wait() }(n.cmd, n.done)
}

// waitJetStream waits until each node answers JetStream API requests, which
// needs a meta leader: the cluster has its quorum.
func (c *natsCluster) waitJetStream(nodes ...*natsNode) {
	c.t.Helper()
	for _, n := range nodes {
		testenv.Eventually(c.t, 30*time.Second, "JetStream through "+n.name, func() (bool, error) {
			nc, err := nats.Connect(n.url(), nats.Timeout(time.Second))
			if err != nil {
				return false, err
			}
			defer nc.Close()
			js, err := jetstream.New(nc)
			if err != nil {
				return false, err
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_, err = js.AccountInfo(ctx)
			return err == nil, err
		})
	}
}

// urls lists every node, for clients that may use any.
func (c *natsCluster) urls() string {
	var u []string
	for _, n := range c.nodes {
		u = append(u, n.url())
	}
	return strings.Join(u, ",")
}

func (c *natsCluster) node(name string) *natsNode {
	c.t.Helper()
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	c.t.Fatalf("no nats-server named %q in the cluster", name)
	return nil
}

// kill sends SIGKILL: no flush, no leadership hand-over.
func (c *natsCluster) kill(n *natsNode) {
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.done
	n.done <- nil
}

// lameDuck sends SIGUSR2, as `nats-server --signal ldm` does, and waits for
// the server to exit by itself.
func (c *natsCluster) lameDuck(n *natsNode) {
	c.t.Helper()
	testenv.Must(c.t, n.cmd.Process.Signal(syscall.SIGUSR2), "lame duck "+n.name)
	select {
	case err := <-n.done:
		n.done <- err
	case <-time.After(lameDuckDuration + 30*time.Second):
		c.t.Fatalf("nats-server %s still running %s after entering lame duck mode", n.name, lameDuckDuration+30*time.Second)
	}
}

// replicaSet reads the stream's cluster state from its leader: the leader's
// name and every replica's name with whether it is current. It fails while
// the stream has no leader.
func replicaSet(ctx context.Context, js jetstream.JetStream, stream string) (string, map[string]bool, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return "", nil, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return "", nil, err
	}
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return "", nil, fmt.Errorf("stream %s has no leader", stream)
	}
	peers := map[string]bool{info.Cluster.Leader: true}
	for _, r := range info.Cluster.Replicas {
		peers[r.Name] = r.Current && !r.Offline
	}
	return info.Cluster.Leader, peers, nil
}

// waitStreamCurrent waits until the stream and both consumers have a leader
// and every one of their replicas is current (a restarted server has caught
// up), and returns how long that took.
func waitStreamCurrent(t *testing.T, js jetstream.JetStream, topo events.Topology) time.Duration {
	t.Helper()
	start := time.Now()
	testenv.Eventually(t, 2*time.Minute, "stream and consumers with 3 current replicas", func() (bool, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, peers, err := replicaSet(ctx, js, topo.Stream)
		if err != nil || len(peers) != 3 {
			return false, err
		}
		for _, ok := range peers {
			if !ok {
				return false, nil
			}
		}
		for _, name := range []string{topo.Persister, topo.Recovery} {
			cons, err := js.Consumer(ctx, topo.Stream, name)
			if err != nil {
				return false, err
			}
			info, err := cons.Info(ctx)
			if err != nil || info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2 {
				return false, err
			}
			for _, r := range info.Cluster.Replicas {
				if !r.Current || r.Offline {
					return false, nil
				}
			}
		}
		return true, nil
	})
	return time.Since(start)
}

// clusterStream connects the test to every node and provisions the stream
// with three replicas, removed at the end.
func clusterStream(t *testing.T, c *natsCluster) (jetstream.JetStream, events.Topology) {
	t.Helper()
	nc, err := nats.Connect(c.urls(), nats.Name("tokenpipe-test"), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	testenv.Must(t, err, "connect to the cluster")
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	topo := testenv.Topology()
	topo.Replicas = 3
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = events.Provision(ctx, js, topo)
	testenv.Must(t, err, "provision the R3 stream")
	return js, topo
}
