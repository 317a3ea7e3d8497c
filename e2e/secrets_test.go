package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestNoPlaintextInLogsStreamOrDatabase issues tokens of both grants through
// real processes logging at debug level, including a race that makes
// recovery deactivate tokens, then searches every process's output, every
// stream message (body and headers) and a text dump of every table for the
// tokens, refresh tokens, client secret and user password.
func TestNoPlaintextInLogsStreamOrDatabase(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	ctx := ctxT(t, 2*time.Minute)
	secret, err := clients.Add(ctx, pool, "secret-app", []string{"read", "write"}, []string{"client_credentials", "password"})
	testenv.Must(t, err, "client")
	const password = "hunter2-correct-horse"
	testenv.Must(t, clients.AddUser(ctx, pool, "carol", password, 4), "user")

	d := newDeployment(t, dbURL, topo, "TOKENPIPE_LOG_LEVEL=debug")
	iss, tokenURL := d.issuer("issuer")
	per := d.start("persister", "persister")
	rec := d.start("recovery", "recovery")

	secrets := []string{secret, password}
	hc := &http.Client{Timeout: 5 * time.Second}
	for i := range 6 {
		form := url.Values{"grant_type": {"password"}, "username": {"carol"}, "password": {password}, "scope": {"read"}}
		if i%2 == 1 {
			form = url.Values{"grant_type": {"client_credentials"}, "scope": {"read write"}}
		}
		req, _ := http.NewRequest(http.MethodPost, tokenURL, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth("secret-app", secret)
		resp, err := hc.Do(req)
		testenv.Must(t, err, "request")
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var tr struct {
			AccessToken  string `json:"access_token"`
			RefreshToken string `json:"refresh_token"`
		}
		testenv.Must(t, json.Unmarshal(body, &tr), "decode")
		if resp.StatusCode != 200 || tr.AccessToken == "" {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
		secrets = append(secrets, tr.AccessToken)
		if tr.RefreshToken != "" {
			secrets = append(secrets, tr.RefreshToken)
		}
	}
	// Also a failed login, whose password must not be logged either.
	bad := url.Values{"grant_type": {"password"}, "username": {"carol"}, "password": {"wrong-" + password}}
	req, _ := http.NewRequest(http.MethodPost, tokenURL, strings.NewReader(bad.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("secret-app", secret)
	if resp, err := hc.Do(req); err == nil {
		resp.Body.Close()
	}
	secrets = append(secrets, "wrong-"+password)

	testenv.Eventually(t, 30*time.Second, "tokens persisted and one deactivated", func() (bool, error) {
		var rows, inactive int
		err := pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE state = 'INACTIVE') FROM tokens`).Scan(&rows, &inactive)
		return err == nil && rows == 6 && inactive >= 2, err
	})

	var haystacks []string
	for _, p := range []*proc{iss, per, rec} {
		haystacks = append(haystacks, p.output())
	}
	stream, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	info, err := stream.Info(ctx)
	testenv.Must(t, err, "info")
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		m, err := stream.GetMsg(ctx, seq)
		if err != nil {
			continue
		}
		h, _ := json.Marshal(m.Header)
		haystacks = append(haystacks, string(m.Data)+string(h))
	}
	if info.State.Msgs < 6 {
		t.Fatalf("stream holds %d messages; the search would prove nothing", info.State.Msgs)
	}
	for _, table := range []string{"tokens", "clients", "users"} {
		var dump string
		testenv.Must(t, pool.QueryRow(context.Background(),
			`SELECT coalesce(string_agg(t::text, E'\n'), '') FROM `+table+` t`).Scan(&dump), "dump "+table)
		haystacks = append(haystacks, dump)
	}
	all := strings.Join(haystacks, "\n")
	if !strings.Contains(all, "secret-app") || len(all) < 1000 {
		t.Fatal("the collected output looks empty; the search would prove nothing")
	}
	for _, s := range secrets {
		if strings.Contains(all, s) {
			t.Errorf("plaintext secret of %d characters found in logs, stream or database", len(s))
		}
	}
}
