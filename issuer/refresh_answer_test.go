package issuer_test

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// cancelKey carries a request's cancel function to cancelAtAnswer.
type cancelKey struct{}

// cancelAtAnswer cancels the request whose query records a rotation as
// answered, just before that query is sent: the moment a client that closes
// its connection right after the mint would cancel it.
type cancelAtAnswer struct{}

func (cancelAtAnswer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if strings.Contains(d.SQL, "SET answered_at") {
		if cancel, ok := ctx.Value(cancelKey{}).(context.CancelFunc); ok {
			cancel()
		}
	}
	return ctx
}

func (cancelAtAnswer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// TestRefreshAnsweredDespiteClientGone: a client that goes away (its request
// context cancelled) between the mint and the answered_at update must not
// get a pair whose use is never recorded. Before the fix the pair was handed
// out (a half-closed connection still reads it) while the rotation stayed
// unanswered, so the old refresh token could be redeemed again at any time
// without tripping reuse detection.
func TestRefreshAnsweredDespiteClientGone(t *testing.T) {
	t.Parallel()
	var cfg issuer.Config
	e, _ := lifecycleEnv(t, func(c *issuer.Config) { c.RefreshGrace = 300 * time.Millisecond; cfg = *c })
	pcfg := e.pool.Config()
	pcfg.ConnConfig.Tracer = cancelAtAnswer{}
	traced, err := pgxpool.NewWithConfig(context.Background(), pcfg)
	testenv.Must(t, err, "traced pool")
	t.Cleanup(traced.Close)
	js, err := issuer.NewJetStream(e.js.Conn(), cfg)
	testenv.Must(t, err, "jetstream")
	iss := issuer.New(cfg, clients.NewRegistry(traced, time.Minute), e.js.Conn(), js, traced,
		slog.New(slog.NewTextHandler(e.logs, nil)), issuer.NewMetrics(prometheus.NewRegistry()))
	h := iss.Handler()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		h.ServeHTTP(w, r.WithContext(context.WithValue(ctx, cancelKey{}, cancel)))
	}))
	t.Cleanup(srv.Close)

	refresh := e.password(t, e.srv.URL).body["refresh_token"].(string)
	first := e.refreshWith(t, srv.URL, refresh)
	if first.status != 200 {
		// Refusing is also safe: nothing was handed out, a retry gets the pair.
		t.Fatalf("refresh whose client went away after the mint = %d %v; want 200 with its use recorded", first.status, first.body)
	}
	time.Sleep(600 * time.Millisecond) // past the grace window of that answer
	if a := e.refreshWith(t, e.srv.URL, refresh); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("redemption after the grace window of an answered refresh = %d %v, want invalid_grant: "+
			"the pair was handed out but its use never recorded", a.status, a.body)
	}
}

// TestRefreshNotHandedOutUnrecorded: when the rotation cannot be recorded as
// answered, the pair is not handed out (503); the retry gets the same pair
// once it can be recorded.
func TestRefreshNotHandedOutUnrecorded(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, func(c *issuer.Config) { c.RefreshGrace = 300 * time.Millisecond })
	ctx := context.Background()
	_, err := e.pool.Exec(ctx, `
		CREATE FUNCTION refuse_answer() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN RAISE EXCEPTION 'test: answered_at cannot be written'; END $$;
		CREATE TRIGGER refuse_answer BEFORE UPDATE OF answered_at ON refresh_rotations
			FOR EACH ROW EXECUTE FUNCTION refuse_answer()`)
	testenv.Must(t, err, "create trigger")
	refresh := e.password(t, e.srv.URL).body["refresh_token"].(string)
	if a := e.refreshWith(t, e.srv.URL, refresh); a.status != 503 {
		t.Fatalf("refresh whose use cannot be recorded = %d %v, want 503", a.status, a.body)
	}
	_, err = e.pool.Exec(ctx, `DROP TRIGGER refuse_answer ON refresh_rotations`)
	testenv.Must(t, err, "drop trigger")
	time.Sleep(600 * time.Millisecond)
	retry := e.refreshWith(t, e.srv.URL, refresh)
	if retry.status != 200 {
		t.Fatalf("retry once the use can be recorded = %d %v, want 200", retry.status, retry.body)
	}
	time.Sleep(600 * time.Millisecond)
	if a := e.refreshWith(t, e.srv.URL, refresh); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("redemption after the answered retry's grace window = %d %v, want invalid_grant", a.status, a.body)
	}
}

// TestRefreshTokenDiesWithItsUsersName: a refresh token issued to a user
// who was removed stays dead when someone of the same name is added later
// (the name is free again once removed); a password reset of an existing
// user (the same row) leaves it alone.
func TestRefreshTokenDiesWithItsUsersName(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, nil)
	ctx := context.Background()
	reset := e.password(t, e.srv.URL).body["refresh_token"].(string)
	testenv.Must(t, clients.AddUser(ctx, e.pool, "alice", userPassword, 4), "reset password")
	if a := e.refreshWith(t, e.srv.URL, reset); a.status != 200 {
		t.Fatalf("refresh after a password reset = %d %v, want 200", a.status, a.body)
	}
	old := e.password(t, e.srv.URL).body["refresh_token"].(string)
	testenv.Must(t, clients.RemoveUser(ctx, e.pool, "alice"), "remove user")
	testenv.Must(t, clients.AddUser(ctx, e.pool, "alice", "another person's password", 4), "add user again")
	// As if the name was taken again ten minutes later.
	_, err := e.pool.Exec(ctx, `UPDATE users SET created_at = created_at + interval '10 minutes' WHERE username = 'alice'`)
	testenv.Must(t, err, "age the user")
	if a := e.refreshWith(t, e.srv.URL, old); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("refresh of the removed user's token after the name was added again = %d %v, want invalid_grant", a.status, a.body)
	}
	if a := e.introspectAs(t, "app", e.secret, old); a.body["active"] != false {
		t.Fatalf("the removed user's refresh token introspects as %v", a.body)
	}
}
