// Package e2e runs the real tokenpipe binary as separate OS processes
// against the machine's Postgres and NATS, the way pods run it.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tokenpipe-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "tokenpipe")
	build := exec.Command("go", "build", "-race", "-o", binary, "../cmd/tokenpipe")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: build tokenpipe:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// deployment is the environment every process of one test shares.
type deployment struct {
	t    *testing.T
	env  []string
	topo events.Topology
}

func newDeployment(t *testing.T, dbURL string, topo events.Topology, extra ...string) *deployment {
	env := append(os.Environ(),
		"TOKENPIPE_DATABASE_URL="+dbURL,
		"TOKENPIPE_NATS_URL="+testenv.NATSURL(),
		"TOKENPIPE_STREAM="+topo.Stream,
		"TOKENPIPE_SUBJECT_PREFIX="+topo.Prefix,
		"TOKENPIPE_STREAM_MAX_AGE="+topo.MaxAge.String(),
		"TOKENPIPE_LOG_FORMAT=text",
		"TOKENPIPE_SHUTDOWN_TIMEOUT=10s",
		"TOKENPIPE_LAG_INTERVAL=1s",
		"TOKENPIPE_TOKEN_KEYS="+testenv.KeyText,
		// The race tests send identical requests on purpose.
		"TOKENPIPE_COALESCE_WINDOW=0s",
	)
	return &deployment{t: t, env: append(env, extra...), topo: topo}
}

// proc is one running tokenpipe process.
type proc struct {
	name    string
	cmd     *exec.Cmd
	opsAddr string
	out     *bytes.Buffer
	mu      *sync.Mutex
	done    chan error
}

// start runs `tokenpipe role` with the deployment's environment plus env,
// and waits until its /readyz answers 200.
func (d *deployment) start(name, role string, env ...string) *proc {
	d.t.Helper()
	ops := freeAddr(d.t)
	cmd := exec.Command(binary, role)
	cmd.Env = append(append(append([]string{}, d.env...), "TOKENPIPE_OPS_ADDR="+ops), env...)
	p := &proc{name: name, cmd: cmd, opsAddr: ops, out: &bytes.Buffer{}, mu: &sync.Mutex{}, done: make(chan error, 1)}
	w := lockedWriter{p}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		d.t.Fatalf("start %s: %v", name, err)
	}
	go func() { p.done <- cmd.Wait() }()
	d.t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if d.t.Failed() {
			d.t.Logf("--- output of %s ---\n%s", p.name, p.output())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-p.done:
			d.t.Fatalf("%s exited during start: %v\n%s", name, err, p.output())
		default:
		}
		resp, err := http.Get("http://" + ops + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.t.Fatalf("%s not ready after 30s\n%s", name, p.output())
	return nil
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// kill sends SIGKILL: no drain, no ack, no goodbye.
func (p *proc) kill(t *testing.T) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// terminate sends SIGTERM and waits for a clean exit within limit.
func (p *proc) terminate(t *testing.T, limit time.Duration) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("%s exited with %v after SIGTERM\n%s", p.name, err, p.output())
		}
	case <-time.After(limit):
		t.Fatalf("%s still running %s after SIGTERM", p.name, limit)
	}
}

type lockedWriter struct{ p *proc }

func (w lockedWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.p.out.Write(b)
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
