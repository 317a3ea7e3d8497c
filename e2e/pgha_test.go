package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// haPair is a Postgres primary with one streaming standby, both the test's
// own, and the multi-host URL the roles are given: with
// target_session_attrs=read-write pgx skips a host that is down or read-only,
// so the roles follow a promotion without a restart.
type haPair struct {
	primary, standby *pgCluster
	link             *replLink // nil when the standby streams directly
	url              string
}

// startHAPair initialises a primary, clones a standby from it with
// pg_basebackup and waits until it streams. With sync the primary's commits
// wait for the standby (synchronous_standby_names='*', synchronous_commit=on).
// With link the standby streams through a replLink the test can hold.
func startHAPair(t testing.TB, sync, link, fsync bool) *haPair {
	t.Helper()
	p := newPGDir(t)
	p.fsync = fsync
	p.run("initdb", "-D", p.dir, "-A", "trust", "-U", "postgres", "--no-sync")
	p.start()
	t.Cleanup(p.shutdown)

	s := newPGDir(t)
	s.fsync = fsync
	s.run("pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(p.port), "-U", "postgres",
		"-D", s.dir, "-R", "-X", "stream", "--no-sync")
	ha := &haPair{primary: p, standby: s}
	if link {
		ha.link = newReplLink(t, fmt.Sprintf("127.0.0.1:%d", p.port))
		// The later line of postgresql.auto.conf wins over the one -R wrote.
		f, err := os.OpenFile(filepath.Join(s.dir, "postgresql.auto.conf"), os.O_APPEND|os.O_WRONLY, 0)
		testenv.Must(t, err, "standby settings")
		_, err = fmt.Fprintf(f, "primary_conninfo = 'host=127.0.0.1 port=%d user=postgres application_name=standby'\n", ha.link.port())
		testenv.Must(t, errors.Join(err, f.Close()), "standby settings")
	}
	s.start()
	t.Cleanup(s.shutdown)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := pgxpool.New(ctx, p.url())
	testenv.Must(t, err, "primary pool")
	defer pool.Close()
	want := "async"
	if sync {
		_, err = pool.Exec(ctx, `ALTER SYSTEM SET synchronous_standby_names = '*'`)
		testenv.Must(t, err, "synchronous_standby_names")
		_, err = pool.Exec(ctx, `SELECT pg_reload_conf()`)
		testenv.Must(t, err, "reload")
		want = "sync"
	}
	testenv.Eventually(t, 30*time.Second, "standby streaming ("+want+")", func() (bool, error) {
		var n int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = $1`, want).Scan(&n)
		return n == 1, err
	})
	ha.url = fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/postgres?sslmode=disable&target_session_attrs=read-write&connect_timeout=5",
		p.port, s.port)
	return ha
}

// crash SIGKILLs the server and every process it started at once, as a
// machine failure would: nothing more is written, flushed or sent.
func (c *pgCluster) crash() {
	c.t.Helper()
	b, err := os.ReadFile(filepath.Join(c.dir, "postmaster.pid"))
	testenv.Must(c.t, err, "postmaster.pid")
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	testenv.Must(c.t, err, "postmaster pid")
	victims := append(childrenOf(pid), pid)
	for _, v := range victims {
		_ = syscall.Kill(v, syscall.SIGKILL)
	}
	c.killed = true
}

// childrenOf lists the processes whose parent is pid, from /proc.
func childrenOf(pid int) []int {
	dirs, _ := filepath.Glob("/proc/[0-9]*/stat")
	var kids []int
	for _, d := range dirs {
		b, err := os.ReadFile(d)
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		fields := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(fields) > 1 && fields[1] == strconv.Itoa(pid) {
			if k, err := strconv.Atoi(filepath.Base(filepath.Dir(d))); err == nil {
				kids = append(kids, k)
			}
		}
	}
	return kids
}

// promote ends the standby's recovery: it becomes a read-write primary.
func (c *pgCluster) promote() {
	c.t.Helper()
	c.run("pg_ctl", "-D", c.dir, "-w", "-t", "60", "promote")
}

// replLink carries the replication connection from the primary to the
// standby through the test. hold keeps the primary's WAL from reaching the
// standby, as a congested or partitioned network would, while the primary
// goes on committing; when the primary dies, what the link held is lost
// with it. Replies from the standby always pass, so a held link is
// replication lag, not a broken connection.
type replLink struct {
	ln     net.Listener
	target string
	held   atomic.Bool
	mu     sync.Mutex
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newReplLink(t testing.TB, target string) *replLink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "replication link")
	l := &replLink{ln: ln, target: target}
	l.wg.Add(1)
	go l.accept()
	t.Cleanup(l.close)
	return l
}

func (l *replLink) port() int { return l.ln.Addr().(*net.TCPAddr).Port }

// hold stops forwarding WAL to the standby from now on.
func (l *replLink) hold() { l.held.Store(true) }

func (l *replLink) accept() {
	defer l.wg.Done()
	for {
		down, err := l.ln.Accept()
		if err != nil {
			return // closed
		}
		up, err := net.Dial("tcp", l.target)
		if err != nil {
			down.Close() // the primary is gone; the standby will retry
			continue
		}
		l.mu.Lock()
		l.conns = append(l.conns, down, up)
		l.mu.Unlock()
		l.wg.Add(2)
		go l.forwardWAL(up, down)
		go func() {
			defer l.wg.Done()
			_, _ = io.Copy(up, down)
			up.Close()
		}()
	}
}

// forwardWAL copies the primary's stream to the standby until the link is
// held; from then on it reads and discards, so the primary's sends never
// block and the standby never sees what was committed after the hold.
func (l *replLink) forwardWAL(up, down net.Conn) {
	defer l.wg.Done()
	defer down.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := up.Read(buf)
		if n > 0 && !l.held.Load() {
			if _, werr := down.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (l *replLink) close() {
	l.ln.Close()
	l.mu.Lock()
	for _, c := range l.conns {
		c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}
