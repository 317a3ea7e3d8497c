package e2e

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// addClient registers a client the way `tokenpipe client add` stores it:
// only the secret's SHA-256 digest.
func addClient(t testing.TB, pool *pgxpool.Pool, id, secret string, scopes ...string) {
	t.Helper()
	d := sha256.Sum256([]byte(secret))
	_, err := pool.Exec(ctxT(t, 10*time.Second),
		`INSERT INTO clients (client_id, secret_digest, scopes, grants) VALUES ($1, $2, $3, '{client_credentials,password}')`,
		id, d[:], scopes)
	testenv.Must(t, err, "add client")
}

// issuerAt starts an issuer process and returns its token URL.
func (d *deployment) issuer(name string, env ...string) (*proc, string) {
	addr := freeAddr(d.t)
	p := d.start(name, "issuer", append([]string{"TOKENPIPE_HTTP_ADDR=" + addr}, env...)...)
	return p, "http://" + addr + "/oauth2/token"
}

type tokenResponse struct {
	AccessToken string `json:"access_token"`
	TokenType   string `json:"token_type"`
	ExpiresIn   int    `json:"expires_in"`
	Scope       string `json:"scope"`
	Error       string `json:"error"`
}

func requestToken(client *http.Client, tokenURL, id, secret, scope string) (int, tokenResponse, error) {
	form := url.Values{"grant_type": {"client_credentials"}, "scope": {scope}}
	req, _ := http.NewRequest(http.MethodPost, tokenURL, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(id, secret)
	resp, err := client.Do(req)
	if err != nil {
		return 0, tokenResponse{}, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var tr tokenResponse
	if err := json.Unmarshal(body, &tr); err != nil {
		return resp.StatusCode, tr, fmt.Errorf("decode %q: %w", body, err)
	}
	return resp.StatusCode, tr, nil
}

// TestIdenticalRequestsThroughTwoIssuersKeepNewestActive fires N identical
// requests at once through two issuer processes. Every token handed out gets
// a row; exactly one is ACTIVE, the one JetStream accepted last.
func TestIdenticalRequestsThroughTwoIssuersKeepNewestActive(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	addClient(t, pool, "race-app", "s3cret-race", "read", "write")
	d := newDeployment(t, dbURL, topo)
	_, url1 := d.issuer("issuer-1")
	_, url2 := d.issuer("issuer-2")
	d.start("persister", "persister")
	d.start("recovery", "recovery")

	const n = 20
	client := &http.Client{Timeout: 10 * time.Second}
	var mu sync.Mutex
	var digests []events.Digest
	var wg sync.WaitGroup
	gate := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			target := url1
			if i%2 == 1 {
				target = url2
			}
			code, tr, err := requestToken(client, target, "race-app", "s3cret-race", "write read")
			if err != nil || code != http.StatusOK {
				t.Errorf("request %d: %d %+v %v", i, code, tr, err)
				return
			}
			mu.Lock()
			digests = append(digests, events.DigestOf(tr.AccessToken))
			mu.Unlock()
		}()
	}
	close(gate)
	wg.Wait()
	if len(digests) != n {
		t.Fatalf("%d of %d requests got a token", len(digests), n)
	}
	stream, err := js.Stream(ctxT(t, 5*time.Second), topo.Stream)
	testenv.Must(t, err, "stream")
	testenv.Eventually(t, 30*time.Second, "clean audit", func() (bool, error) {
		r, err := audit.Check(ctxT(t, 10*time.Second), pool, digests, stream, topo.Persister, topo.Recovery)
		return err == nil && r.Clean(), err
	})
	var active, rows int
	var activeSeq, maxSeq int64
	testenv.Must(t, pool.QueryRow(ctxT(t, 5*time.Second), `
		SELECT count(*) FILTER (WHERE state = 'ACTIVE'), count(*),
		       coalesce(max(stream_seq) FILTER (WHERE state = 'ACTIVE'), 0), max(stream_seq)
		FROM tokens WHERE client_id = 'race-app' AND subject = 'race-app' AND scope = 'read write'`).
		Scan(&active, &rows, &activeSeq, &maxSeq), "states")
	if rows != n || active != 1 || activeSeq != maxSeq {
		t.Fatalf("rows=%d active=%d activeSeq=%d maxSeq=%d; want %d rows, 1 ACTIVE with the highest sequence", rows, active, activeSeq, maxSeq, n)
	}
}
