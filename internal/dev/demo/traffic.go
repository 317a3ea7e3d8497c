package demo

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
)

// Traffic is what the demo sends.
type Traffic struct {
	URL          string // token endpoint
	ClientID     string
	ClientSecret string
	Scopes       []string // the client's allowed scopes
	Requests     int      // requests for distinct keys
	RaceKeys     int      // keys requested by several clients at once
	RaceWidth    int      // simultaneous requests per raced key
	Concurrency  int
}

// Outcome counts answers and remembers the digest of every token handed out.
type Outcome struct {
	OK, Failed int
	Errors     map[string]int
	Digests    []events.Digest
	Elapsed    time.Duration
}

// Send runs the traffic: distinct keys first, then bursts of identical
// requests that race for one key, and returns what came back.
func Send(ctx context.Context, t Traffic) (*Outcome, error) {
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: t.Concurrency, MaxConnsPerHost: t.Concurrency},
	}
	defer client.CloseIdleConnections()
	out := &Outcome{Errors: map[string]int{}}
	var mu sync.Mutex
	record := func(d *events.Digest, kind string) {
		mu.Lock()
		defer mu.Unlock()
		if d != nil {
			out.OK++
			out.Digests = append(out.Digests, *d)
			return
		}
		out.Failed++
		out.Errors[kind]++
	}
	start := time.Now()
	jobs := make(chan []string)
	var wg sync.WaitGroup
	for range t.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for scopes := range jobs {
				d, kind := request(ctx, client, t, strings.Join(scopes, " "))
				record(d, kind)
			}
		}()
	}
	// Distinct keys: pairs of scopes, each pair once.
	sent := 0
	for i := 0; i < len(t.Scopes) && sent < t.Requests; i++ {
		for j := i + 1; j < len(t.Scopes) && sent < t.Requests; j++ {
			select {
			case jobs <- []string{t.Scopes[i], t.Scopes[j]}:
			case <-ctx.Done():
			}
			sent++
		}
	}
	close(jobs)
	wg.Wait()

	// Races: RaceWidth identical requests released together, per key.
	for k := 0; k < t.RaceKeys && ctx.Err() == nil; k++ {
		scope := t.Scopes[k%len(t.Scopes)]
		var burst sync.WaitGroup
		gate := make(chan struct{})
		for range t.RaceWidth {
			burst.Add(1)
			go func() {
				defer burst.Done()
				<-gate
				d, kind := request(ctx, client, t, scope)
				record(d, kind)
			}()
		}
		close(gate)
		burst.Wait()
	}
	out.Elapsed = time.Since(start)
	return out, ctx.Err()
}

// request performs one client_credentials request and returns the digest of
// the token it got, or an error kind.
func request(ctx context.Context, client *http.Client, t Traffic, scope string) (*events.Digest, string) {
	form := url.Values{"grant_type": {"client_credentials"}, "scope": {scope}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.URL, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, "request"
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(url.QueryEscape(t.ClientID), url.QueryEscape(t.ClientSecret))
	resp, err := client.Do(req)
	if err != nil {
		return nil, "transport"
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return nil, "transport"
	}
	var tok struct {
		AccessToken string `json:"access_token"`
		Error       string `json:"error"`
	}
	_ = json.Unmarshal(body, &tok)
	if resp.StatusCode != http.StatusOK || tok.AccessToken == "" {
		return nil, fmt.Sprintf("%d %s", resp.StatusCode, tok.Error)
	}
	d := events.Digest(sha256.Sum256([]byte(tok.AccessToken)))
	return &d, ""
}
