package e2e

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// handout is one token a request received.
type handout struct {
	digest     events.Digest
	scope      string
	sent, recv time.Time
}

// TestIdenticalRequestsDoNotChurn is what a multi-threaded client sees: it
// asks for the same few tokens over and over, each request sent several
// times at once, over many connections spread across two issuers, for long
// enough that request latency exceeds the persist-plus-recovery lag. The row
// invariants hold either way; what must also hold is that a key gets at most
// the bound of distinct tokens per coalescing window (not a fresh token per
// request, each deactivating the one before) and that no token is handed out
// after its row was already dead.
//
// A few times during the run, one issuer is stopped (SIGSTOP) just before a
// window boundary and continued a moment after it, as a long GC pause or a
// starved CPU would: requests it was handling then reach JetStream after the
// next window's token has superseded theirs. On an unloaded machine latency
// alone rarely gets there, and the test must fail reliably when the issuer
// lets such a late request supersede the current token.
func TestIdenticalRequestsDoNotChurn(t *testing.T) {
	const (
		window    = 2 * time.Second // short, so the run crosses several window boundaries
		copies    = 3               // each request sent this many times at once
		workers   = 32              // x copies = connections in flight
		minTokens = 1000            // the run goes on until this many were handed out
		maxSends  = 30000
		pause     = 500 * time.Millisecond // longer than persist plus recovery lag
		pauses    = 6
	)
	scopes := []string{"s1", "s2", "s3", "s4"}
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	addClient(t, pool, "churn-app", "s3cret-churn", scopes...)
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_COALESCE_WINDOW="+window.String())
	iss1, url1 := d.issuer("issuer-1")
	_, url2 := d.issuer("issuer-2")
	d.start("persister", "persister")
	d.start("recovery", "recovery")
	targets := []string{url1, url2}

	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		MaxIdleConns: 2 * workers * copies, MaxIdleConnsPerHost: workers * copies}}
	defer hc.CloseIdleConnections()
	// The run ends when every pause is done and minTokens were handed out,
	// however long that takes on a busy machine; the timeout only catches
	// a hang.
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	var (
		mu         sync.Mutex
		got        []handout
		failures   = map[string]int{}
		sends      int
		wg         sync.WaitGroup
		pausesDone = make(chan struct{})
		paused     int // pauses completed; owned by the pausing goroutine until pausesDone
	)
	enough := func() bool {
		select {
		case <-pausesDone:
			return len(got) >= minTokens
		default:
			return false
		}
	}
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				mu.Lock()
				if sends >= maxSends || enough() {
					mu.Unlock()
					return
				}
				sends += copies
				mu.Unlock()
				scope := scopes[(w+i)%len(scopes)]
				var cw sync.WaitGroup
				for c := range copies {
					cw.Add(1)
					go func() {
						defer cw.Done()
						target := targets[(w+i+c)%len(targets)]
						sent := time.Now()
						code, tr, err := requestToken(hc, target, "churn-app", "s3cret-churn", scope)
						recv := time.Now()
						mu.Lock()
						defer mu.Unlock()
						switch {
						case err != nil:
							failures["transport"]++
						case code != http.StatusOK:
							failures[http.StatusText(code)+" "+tr.Error]++
						default:
							got = append(got, handout{events.DigestOf(tr.AccessToken), scope, sent, recv})
						}
					}()
				}
				cw.Wait()
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(pausesDone)
		for range pauses {
			// Stop 30 ms before the next boundary at least 200 ms away.
			next := audit.WindowStart(time.Now().Add(200*time.Millisecond), window).Add(window - 30*time.Millisecond)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Until(next)):
			}
			if err := iss1.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Errorf("SIGSTOP issuer-1: %v", err)
				return
			}
			time.Sleep(pause)
			if err := iss1.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Errorf("SIGCONT issuer-1: %v", err)
				return
			}
			paused++
		}
	}()
	wg.Wait()
	// A refused (503: the publish was not acknowledged within the issuer's
	// bound, which a busy machine reaches) or timed-out request hands out no
	// token, so it cannot hide churn, and a client retries it. Any other
	// answer is a fault.
	if !enough() || paused < pauses {
		t.Fatalf("%d tokens from %d requests (want %d after %d pauses, %d done), failures %v", len(got), sends, minTokens, pauses, paused, failures)
	}
	for what, n := range failures {
		if what != "transport" && !strings.HasPrefix(what, http.StatusText(http.StatusServiceUnavailable)+" ") {
			t.Errorf("%d requests answered %q; only 503 may refuse a well-formed request", n, what)
		}
	}

	lastSent := map[events.Digest]time.Time{}
	digests := make([]events.Digest, 0, len(got))
	issues := make([]audit.Issue, 0, len(got))
	latency := make([]time.Duration, 0, len(got))
	for _, h := range got {
		if cur, ok := lastSent[h.digest]; !ok || h.sent.After(cur) {
			lastSent[h.digest] = h.sent
		}
		digests = append(digests, h.digest)
		issues = append(issues, audit.Issue{Key: "churn-app/churn-app/" + h.scope, Digest: h.digest, At: h.recv})
		latency = append(latency, h.recv.Sub(h.sent))
	}
	slices.Sort(latency)
	stream, err := js.Stream(ctxT(t, 5*time.Second), topo.Stream)
	testenv.Must(t, err, "stream")
	testenv.Eventually(t, time.Minute, "clean audit", func() (bool, error) {
		r, err := audit.Check(ctxT(t, 20*time.Second), pool, digests, stream, topo.Persister, topo.Recovery)
		return err == nil && r.Clean(), err
	})
	rep, err := audit.ClientVisible(ctxT(t, 20*time.Second), pool, lastSent, audit.ClientOptions{
		DeadMargin: audit.DefaultDeadMargin, Window: window, Bound: audit.DefaultWindowBound, ClientID: "churn-app"})
	testenv.Must(t, err, "client-visible audit")
	received, receivedOver := audit.MaxPerWindow(issues, window, audit.DefaultWindowBound)
	t.Logf("CHURN|requests %d|tokens received %d (failures %v)|distinct %d|http p50 %s p99 %s|most tokens per key per %s window: %d (%s at %s), %d key-windows over %d|received per window: %d, %d over|handed out dead: %d",
		sends, len(got), failures, len(lastSent), latency[len(latency)/2].Round(time.Millisecond), latency[len(latency)*99/100].Round(time.Millisecond),
		window, rep.MaxPerWindow.Tokens, rep.MaxPerWindow.Key, rep.MaxPerWindow.Window.Format("15:04:05.000"), rep.OverBound, rep.Bound,
		received.Tokens, receivedOver, rep.DeadCount)
	if rep.OverBound > 0 {
		t.Errorf("%d key-windows got more than %d distinct tokens; the worst, %s in the window at %s, got %d",
			rep.OverBound, rep.Bound, rep.MaxPerWindow.Key, rep.MaxPerWindow.Window.Format("15:04:05.000"), rep.MaxPerWindow.Tokens)
	}
	if rep.DeadCount > 0 {
		d := rep.Dead[0]
		t.Errorf("%d tokens handed out already dead; e.g. %s was %s %s before its last request", rep.DeadCount, d.Digest.String()[:12],
			d.State, d.LastSent.Sub(d.StateChangedAt).Round(time.Millisecond))
	}
}
