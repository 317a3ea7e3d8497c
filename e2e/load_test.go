package e2e

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// steadyLoad sends client_credentials requests at a fixed rate, round-robin
// over whichever issuer URLs are current, and records the digest of every
// token that came back with 200. A refused request hands out no token, so it
// needs no row.
type steadyLoad struct {
	mu      sync.Mutex
	targets []string
	digests []events.Digest
	errors  map[string]int
	samples []sample
	sent    atomic.Int64
	stop    context.CancelFunc
	done    chan struct{}
}

func startLoad(t *testing.T, rate int, client, secret string, scopes []string, targets ...string) *steadyLoad {
	ctx, cancel := context.WithCancel(context.Background())
	l := &steadyLoad{targets: targets, errors: map[string]int{}, stop: cancel, done: make(chan struct{})}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	go func() {
		defer close(l.done)
		var wg sync.WaitGroup
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				wg.Wait()
				return
			case <-tick.C:
			}
			l.mu.Lock()
			target := l.targets[i%len(l.targets)]
			l.mu.Unlock()
			scope := scopes[i%len(scopes)]
			wg.Add(1)
			go func() {
				defer wg.Done()
				l.sent.Add(1)
				sent := time.Now()
				code, tr, err := requestToken(hc, target, client, secret, scope)
				l.mu.Lock()
				defer l.mu.Unlock()
				l.samples = append(l.samples, sample{sent: sent, took: time.Since(sent), code: code})
				switch {
				case err != nil:
					l.errors["transport"]++
				case code != http.StatusOK:
					l.errors[http.StatusText(code)]++
				default:
					l.digests = append(l.digests, events.DigestOf(tr.AccessToken))
				}
			}()
		}
	}()
	t.Cleanup(func() { l.stop(); <-l.done })
	return l
}

func (l *steadyLoad) setTargets(targets ...string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.targets = targets
}

// sample is one request: when it was sent, how long the answer took, and
// its HTTP status (0 for a transport error).
type sample struct {
	sent time.Time
	took time.Duration
	code int
}

// issuedSoFar returns the digests of the tokens issued until now.
func (l *steadyLoad) issuedSoFar() []events.Digest {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.digests)
}

// hangGuard bounds waits that are driven by counts. It only catches a hang:
// on a machine with a load average of 50 on 2 cores a phase may take many
// times longer than alone, and that must not fail a test.
const hangGuard = 5 * time.Minute

// waitMore waits until n more tokens were issued than when it was called;
// phases of a test are driven by this count, not by time, so a busy machine
// slows them down instead of making them too short to prove anything.
func (l *steadyLoad) waitMore(t *testing.T, what string, n int) {
	t.Helper()
	base := len(l.issuedSoFar())
	testenv.Eventually(t, hangGuard, fmt.Sprintf("%s: %d more tokens issued", what, n), func() (bool, error) {
		return len(l.issuedSoFar()) >= base+n, nil
	})
}

// requests returns every request answered or failed so far.
func (l *steadyLoad) requests() []sample {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.samples)
}

// finish stops the load and returns the digests of every token issued.
func (l *steadyLoad) finish() ([]events.Digest, map[string]int) {
	l.stop()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.digests, l.errors
}
