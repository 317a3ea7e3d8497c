package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// The NATS cluster cases run three nats-server processes (built from the
// module go.mod pins) with the stream at three replicas; two issuers on
// different servers, persister and recovery on the third, all under steady
// HTTP load. Each case prints a RELIABILITY line (the common table) and a
// NATSHA line with what a client saw (make chaos writes both into
// RELIABILITY.md). Durations are measured and reported, never asserted.
//
// make test runs the follower kill at a small load; the leader kill and the
// rolling restart run under make chaos (TOKENPIPE_TEST_NATS_CLUSTER=full).
func fullClusterCases(t *testing.T) {
	if os.Getenv("TOKENPIPE_TEST_NATS_CLUSTER") != "full" {
		t.Skip("a make chaos case: set TOKENPIPE_TEST_NATS_CLUSTER=full")
	}
}

// clusterRun is one case's deployment on a three-server cluster.
type clusterRun struct {
	t     *testing.T
	c     *natsCluster
	js    jetstream.JetStream
	topo  events.Topology
	pool  *pgxpool.Pool
	procs []*proc
	on    map[string][]string // server name -> processes connected to it at start
	load  *steadyLoad
	lag   *lagSampler
}

func startClusterRun(t *testing.T, rate int) *clusterRun {
	t.Helper()
	c := startNATSCluster(t)
	dbURL, pool := testenv.Database(t)
	js, topo := clusterStream(t, c)
	var scopes []string
	for i := range 16 {
		scopes = append(scopes, fmt.Sprintf("s%02d", i))
	}
	addClient(t, pool, "ha-app", "ha-secret", scopes...)
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_STREAM_REPLICAS=3", "TOKENPIPE_ACK_WAIT=5s")
	r := &clusterRun{t: t, c: c, js: js, topo: topo, pool: pool, on: map[string][]string{}}
	// Each process is given one server; it learns the others from the
	// cluster and reconnects to them on its own.
	at := func(name string, n *natsNode) string {
		r.on[n.name] = append(r.on[n.name], name)
		return "TOKENPIPE_NATS_URL=" + n.url()
	}
	iss1, url1 := d.issuer("issuer-1", at("issuer-1", c.nodes[0]))
	iss2, url2 := d.issuer("issuer-2", at("issuer-2", c.nodes[1]))
	per := d.start("persister", "persister", at("persister", c.nodes[2]))
	rec := d.start("recovery", "recovery", at("recovery", c.nodes[2]))
	r.procs = []*proc{iss1, iss2, per, rec}
	waitStreamCurrent(t, js, topo)
	r.lag = startLagSampler(t, js, topo)
	r.load = startLoad(t, rate, "ha-app", "ha-secret", scopes, url1, url2)
	return r
}

// leader is the server leading the stream now.
func (r *clusterRun) leader() *natsNode {
	r.t.Helper()
	var name string
	testenv.Eventually(r.t, 30*time.Second, "stream leader", func() (bool, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		var err error
		name, _, err = replicaSet(ctx, r.js, r.topo.Stream)
		return err == nil, err
	})
	return r.c.node(name)
}

// consumerLeader is the server leading the named consumer now.
func (r *clusterRun) consumerLeader(name string) string {
	r.t.Helper()
	var leader string
	testenv.Eventually(r.t, 30*time.Second, "leader of consumer "+name, func() (bool, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		cons, err := r.js.Consumer(ctx, r.topo.Stream, name)
		if err != nil {
			return false, err
		}
		info, err := cons.Info(ctx)
		if err != nil || info.Cluster == nil {
			return false, err
		}
		leader = info.Cluster.Leader
		return leader != "", nil
	})
	return leader
}

// follower is a server holding a replica of the stream but not leading it,
// and, where one exists, not leading the persister's consumer either (the
// consumers have Raft groups, and leaders, of their own): its loss is a
// follower's loss only.
func (r *clusterRun) follower() *natsNode {
	r.t.Helper()
	lead, persister := r.leader(), r.consumerLeader(r.topo.Persister)
	var pick *natsNode
	for _, n := range r.c.nodes {
		if n != lead && (pick == nil || pick.name == persister) {
			pick = n
		}
	}
	return pick
}

// leaders describes which server leads the stream and each consumer.
func (r *clusterRun) leaders() string {
	return fmt.Sprintf("leaders: stream %s, persister consumer %s, recovery consumer %s",
		r.leader().name, r.consumerLeader(r.topo.Persister), r.consumerLeader(r.topo.Recovery))
}

// waitIssued waits until n more tokens were issued than so far.
func (r *clusterRun) waitIssued(what string, n int) {
	r.t.Helper()
	base := len(r.load.issuedSoFar())
	testenv.Eventually(r.t, time.Minute, what, func() (bool, error) {
		return len(r.load.issuedSoFar()) >= base+n, nil
	})
}

// rowsFor waits until every digest has exactly one row (nothing else is
// checked: the load goes on) and returns how long it took.
func (r *clusterRun) rowsFor(what string, digests []events.Digest) time.Duration {
	r.t.Helper()
	start := time.Now()
	testenv.Eventually(r.t, 2*time.Minute, what, func() (bool, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		rep, err := audit.Check(ctx, r.pool, digests, nil)
		return err == nil && len(rep.Missing) == 0 && len(rep.Duplicated) == 0, err
	})
	return time.Since(start)
}

// faultOver marks the end of the fault and waits until every token
// answered until then has its row: the backlog the fault left is persisted.
// It returns the end and that wait.
func (r *clusterRun) faultOver() (time.Time, time.Duration) {
	r.t.Helper()
	end := time.Now()
	r.rowsFor("a row for every token answered until the fault ended", r.load.issuedSoFar())
	return end, time.Since(end)
}

// finish stops the load, checks that every role process is still the one
// started (none crashed: they resumed by themselves), audits, and prints
// the case's lines.
func (r *clusterRun) finish(name string, faultStart, faultEnd time.Time, rowsCaughtUp time.Duration, notes string) {
	r.t.Helper()
	time.Sleep(2 * time.Second) // load after the fault, answered by the recovered cluster
	lag := r.lag.stop(faultStart)
	digests, _ := r.load.finish()
	reqs := r.load.requests()
	for _, p := range r.procs {
		select {
		case err := <-p.done:
			r.t.Fatalf("%s exited during the case: %v", p.name, err)
		default:
		}
	}
	after := 0
	for _, s := range reqs {
		if s.sent.After(faultEnd) && s.code == http.StatusOK {
			after++
		}
	}
	if after == 0 {
		r.t.Fatalf("no request sent after the fault got a token")
	}
	rep := auditUntilClean(r.t, name, len(reqs), digests, r.pool, r.js, r.topo, time.Now())
	f := summarize(reqs, faultStart, faultEnd)
	r.t.Logf("NATSHA|%s|%d|%d|%s|%d|%s / %s|%s|%s|%d / %d / %d|%s",
		name, len(reqs), f.ok, f.unavailableText(), f.other, f.p99Before, f.p99During,
		lag, rowsCaughtUp.Round(10*time.Millisecond), len(rep.Missing), len(rep.Duplicated), len(rep.DoubleActive), notes)
}

// faultFigures is what clients saw around a fault.
type faultFigures struct {
	ok, unavailable, other int
	firstUnavailable       time.Time
	lastUnavailable        time.Time
	p99Before, p99During   time.Duration
}

func (f faultFigures) unavailableText() string {
	if f.unavailable == 0 {
		return "0"
	}
	return fmt.Sprintf("%d over %s", f.unavailable, f.lastUnavailable.Sub(f.firstUnavailable).Round(10*time.Millisecond))
}

// summarize counts answers and takes latency percentiles of the requests
// sent in the 2 s before the fault and during it (start to end).
func summarize(reqs []sample, start, end time.Time) faultFigures {
	var f faultFigures
	var before, during []time.Duration
	for _, s := range reqs {
		switch {
		case s.code == http.StatusOK:
			f.ok++
		case s.code == http.StatusServiceUnavailable:
			f.unavailable++
			if f.firstUnavailable.IsZero() || s.sent.Before(f.firstUnavailable) {
				f.firstUnavailable = s.sent
			}
			if s.sent.Add(s.took).After(f.lastUnavailable) {
				f.lastUnavailable = s.sent.Add(s.took)
			}
		default:
			f.other++
		}
		switch {
		case s.sent.Before(start.Add(-2 * time.Second)):
		case s.sent.Before(start):
			before = append(before, s.took)
		case !s.sent.After(end):
			during = append(during, s.took)
		}
	}
	f.p99Before, f.p99During = p99(before), p99(during)
	return f
}

func p99(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[len(d)*99/100].Round(time.Millisecond)
}

// lagSampler reads the persister consumer's lag (num_pending +
// num_ack_pending, what KEDA scales on) every 100 ms. Consumer info is
// answered by the consumer's leader, so a follower's stale view never counts;
// while the consumer has no leader there is no sample.
type lagSampler struct {
	mu      sync.Mutex
	samples []lagSample
	cancel  context.CancelFunc
	done    chan struct{}
}

type lagSample struct {
	at  time.Time
	lag uint64
}

func startLagSampler(t *testing.T, js jetstream.JetStream, topo events.Topology) *lagSampler {
	ctx, cancel := context.WithCancel(context.Background())
	l := &lagSampler{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			reqCtx, stop := context.WithTimeout(ctx, time.Second)
			cons, err := js.Consumer(reqCtx, topo.Stream, topo.Persister)
			var info *jetstream.ConsumerInfo
			if err == nil {
				info, err = cons.Info(reqCtx)
			}
			stop()
			if err == nil {
				l.mu.Lock()
				l.samples = append(l.samples, lagSample{time.Now(), info.NumPending + uint64(info.NumAckPending)})
				l.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { l.cancel(); <-l.done })
	return l
}

// lagFigures are the lag's largest value in the 2 s before the fault (the
// steady state under load: a batch in flight), its peak from the fault on,
// and how long after the fault's start it was back at the steady level
// after that peak (0 if it never rose above it; -1 if it never came back).
type lagFigures struct {
	steady, peak uint64
	back         time.Duration
}

func (f lagFigures) String() string {
	switch {
	case f.peak <= f.steady:
		return fmt.Sprintf("stayed <= %d", f.steady)
	case f.back < 0:
		return fmt.Sprintf("peak %d, not back to <= %d", f.peak, f.steady)
	}
	return fmt.Sprintf("peak %d, back to <= %d after %s", f.peak, f.steady, f.back.Round(10*time.Millisecond))
}

// stop ends sampling and returns the figures around a fault.
func (l *lagSampler) stop(faultStart time.Time) lagFigures {
	l.cancel()
	<-l.done
	f := lagFigures{back: -1}
	var after []lagSample
	for _, s := range l.samples {
		switch {
		case s.at.Before(faultStart.Add(-2 * time.Second)):
		case s.at.Before(faultStart):
			f.steady = max(f.steady, s.lag)
		default:
			after = append(after, s)
		}
	}
	at := 0
	for i, s := range after {
		if s.lag > f.peak {
			f.peak, at = s.lag, i
		}
	}
	if f.peak <= f.steady {
		f.back = 0
		return f
	}
	for _, s := range after[at:] {
		if s.lag <= f.steady {
			f.back = s.at.Sub(faultStart)
			break
		}
	}
	return f
}

func (r *clusterRun) roles(n *natsNode) string {
	if len(r.on[n.name]) == 0 {
		return "no role"
	}
	return strings.Join(r.on[n.name], ", ")
}

// TestNATSFollowerKilledUnderLoad kills a server holding a follower replica
// of the stream with SIGKILL under steady load, keeps it down, restarts it
// on its store and lets it catch up. The stream keeps its quorum throughout.
func TestNATSFollowerKilledUnderLoad(t *testing.T) {
	t.Parallel()
	rate, down := 100, 3*time.Second
	if os.Getenv("TOKENPIPE_TEST_NATS_CLUSTER") == "full" {
		rate, down = 200, 10*time.Second
	}
	r := startClusterRun(t, rate)
	time.Sleep(3 * time.Second) // steady state; the figures before the fault come from its last 2 s
	victim := r.follower()
	before := r.leaders()
	faultStart := time.Now()
	r.c.kill(victim)
	time.Sleep(down)
	r.c.run(victim)
	faultEnd, rows := r.faultOver()
	waitStreamCurrent(t, r.js, r.topo)
	r.finish(fmt.Sprintf("NATS R3: stream follower SIGKILL, down %s, %d req/s", down, rate), faultStart, faultEnd, rows,
		fmt.Sprintf("%s killed (%s on it; %s); all replicas current %s after its restart",
			victim.name, r.roles(victim), before, time.Since(faultEnd).Round(10*time.Millisecond)))
}

// TestNATSLeaderKilledUnderLoad kills the stream leader's server with
// SIGKILL under steady load. While it is down, every token answered before
// the kill must get its row from the two servers left: JetStream acks a
// publish on a replicated stream only once a quorum stored it, so the killed
// leader cannot have held the only copy. Then the server restarts on its
// store and catches up.
func TestNATSLeaderKilledUnderLoad(t *testing.T) {
	fullClusterCases(t)
	t.Parallel()
	const rate, down = 200, 10 * time.Second
	r := startClusterRun(t, rate)
	time.Sleep(3 * time.Second) // steady state; the figures before the fault come from its last 2 s
	victim := r.leader()
	before := r.leaders()
	faultStart := time.Now()
	r.c.kill(victim)
	answered := r.load.issuedSoFar()
	r.rowsFor("a row for every token answered before the leader was killed, leader still down", answered)
	r.waitIssued("tokens issued through the new leader", 50)
	newLeader := r.leader()
	time.Sleep(time.Until(faultStart.Add(down)))
	r.c.run(victim)
	faultEnd, rows := r.faultOver()
	waitStreamCurrent(t, r.js, r.topo)
	r.finish(fmt.Sprintf("NATS R3: stream leader SIGKILL, down %s, %d req/s", down, rate), faultStart, faultEnd, rows,
		fmt.Sprintf("%s killed (%s on it; %s), %s took over; the %d tokens answered before the kill all had rows while it was down; all replicas current %s after its restart",
			victim.name, r.roles(victim), before, newLeader.name, len(answered), time.Since(faultEnd).Round(10*time.Millisecond)))
}

// TestNATSRollingRestartUnderLoad restarts the three servers one at a time
// under steady load, each through lame duck mode (SIGUSR2: its leaderships
// move away, then its clients are closed a second apart), waiting for the
// restarted server to be current before the next.
func TestNATSRollingRestartUnderLoad(t *testing.T) {
	fullClusterCases(t)
	t.Parallel()
	const rate = 200
	r := startClusterRun(t, rate)
	time.Sleep(3 * time.Second) // steady state; the figures before the fault come from its last 2 s
	faultStart := time.Now()
	var steps []string
	for _, n := range r.c.nodes {
		note := ""
		if r.leader() == n {
			note = ", was leader"
		}
		stepStart := time.Now()
		r.c.lameDuck(n)
		r.c.run(n)
		r.c.waitJetStream(n)
		waitStreamCurrent(t, r.js, r.topo)
		steps = append(steps, fmt.Sprintf("%s %s%s", n.name, time.Since(stepStart).Round(100*time.Millisecond), note))
	}
	faultEnd, rows := r.faultOver()
	r.finish(fmt.Sprintf("NATS R3: rolling restart of 3 servers in lame duck mode, %d req/s", rate), faultStart, faultEnd, rows,
		"each server from lame duck to all replicas current: "+strings.Join(steps, ", "))
}
