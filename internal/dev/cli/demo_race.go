package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// raceScope is the key of the race step: three scopes, a key the demo's
// traffic (single scopes and pairs) never asks for.
const raceScope = "s00 s01 s02"

// raceDemo makes two tokens of one key race through recovery. Identical
// requests share one token within a coalescing window, so the demo's traffic
// alone never gets there. Here a second issuer instance with coalescing off
// (as two instances would be mid key-rotation, or a client asking again in
// the next window) mints a different token for the same key after the
// first one was persisted ACTIVE: the persister finds that older ACTIVE row
// and hands the newer token to recovery, which makes the older INACTIVE.
// It returns both tokens' digests, first the older.
func raceDemo(ctx context.Context, cfg issuer.Config, reg *clients.Registry, nc *nats.Conn, js jetstream.JetStream, pool *pgxpool.Pool,
	log *slog.Logger, tokenURL, clientID, secret string, say func(string, ...any)) ([]events.Digest, error) {
	cfg.CoalesceWindow, cfg.Instance = -1, cfg.Instance+"-b"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	secondURL := "http://" + ln.Addr().String() + "/oauth2/token"
	second := app.StartPipeline(context.WithoutCancel(ctx), pool, js, app.PipelineConfig{
		Issuer: &cfg, Clients: reg, NC: nc, Listener: ln, IssuerGrace: 5 * time.Second, Log: log,
		OnStop: func(_ string, err error) { log.Error("demo: second issuer stopped", "err", err) },
	})
	defer func() { _ = second.Stop() }()

	older, err := demoToken(ctx, tokenURL, clientID, secret, raceScope)
	if err != nil {
		return nil, fmt.Errorf("first token: %w", err)
	}
	if err := waitState(ctx, pool, older, "ACTIVE"); err != nil {
		return nil, err
	}
	newer, err := demoToken(ctx, secondURL, clientID, secret, raceScope)
	if err != nil {
		return nil, fmt.Errorf("second token: %w", err)
	}
	if err := waitState(ctx, pool, older, "INACTIVE"); err != nil {
		return nil, err
	}
	say("race through recovery: token A for %q from the issuer, persisted ACTIVE; then token B for the", raceScope)
	say("  same key from a second issuer instance with coalescing off (so a different token). B's event is")
	say("  newer in the stream; the persister found A ACTIVE and passed B to recovery, which made A INACTIVE")
	return []events.Digest{older, newer}, nil
}

// raceRows prints the two tokens' rows.
func raceRows(ctx context.Context, pool *pgxpool.Pool, ds []events.Digest, say func(string, ...any)) error {
	for i, d := range ds {
		rows, err := store.RowStates(ctx, pool, []events.Digest{d})
		if err != nil || len(rows) != 1 {
			return fmt.Errorf("race row: %d rows, %v", len(rows), err)
		}
		state, seq, persisted, changed := rows[0].State, rows[0].StreamSeq, rows[0].PersistedAt, rows[0].StateChangedAt
		line := fmt.Sprintf("  token %c  %s  stream seq %d  %-8s", 'A'+i, d.String()[:12], seq, state)
		if state != "ACTIVE" {
			line += fmt.Sprintf("  (made %s %s after it was persisted)", state, changed.Sub(persisted).Round(time.Millisecond))
		}
		say("%s", strings.TrimRight(line, " "))
	}
	return nil
}

// waitState waits until the token's row is in state.
func waitState(ctx context.Context, pool *pgxpool.Pool, d events.Digest, state string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		var got string
		rows, err := store.RowStates(ctx, pool, []events.Digest{d})
		if len(rows) == 1 {
			got = rows[0].State
		}
		if err == nil && got == state {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("token %s not %s after 30s (state %q, %v)", d.String()[:12], state, got, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// demoToken asks for a client_credentials token and returns its digest.
func demoToken(ctx context.Context, tokenURL, clientID, secret, scope string) (events.Digest, error) {
	form := url.Values{"grant_type": {"client_credentials"}, "scope": {scope}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, tokenURL, strings.NewReader(form.Encode()))
	if err != nil {
		return events.Digest{}, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(url.QueryEscape(clientID), url.QueryEscape(secret))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return events.Digest{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return events.Digest{}, err
	}
	var tok struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.Unmarshal(body, &tok); err != nil || resp.StatusCode != http.StatusOK || tok.AccessToken == "" {
		return events.Digest{}, fmt.Errorf("HTTP %d %q", resp.StatusCode, body)
	}
	return events.DigestOf(tok.AccessToken), nil
}
