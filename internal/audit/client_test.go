package audit_test

import (
	"context"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

func TestWindowStartCutsLikeTheIssuer(t *testing.T) {
	w := 5 * time.Second
	for _, c := range []struct {
		ms, want int64
	}{
		{0, 0}, {4999, 0}, {5000, 5000}, {1_700_000_004_999, 1_700_000_000_000}, {1_700_000_005_000, 1_700_000_005_000},
		{-1, -5000}, {-5000, -5000},
	} {
		if got := audit.WindowStart(time.UnixMilli(c.ms), w).UnixMilli(); got != c.want {
			t.Errorf("WindowStart(%d ms) = %d, want %d", c.ms, got, c.want)
		}
	}
}

func TestHandedOutDead(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	d := func(s string) events.Digest { return events.DigestOf(s) }
	rows := []audit.RowState{
		{Digest: d("live"), State: "ACTIVE", StateChangedAt: t0},
		{Digest: d("dead-long-before"), State: "INACTIVE", StateChangedAt: t0},
		{Digest: d("revoked-before"), State: "REVOKED", StateChangedAt: t0.Add(time.Second)},
		{Digest: d("within-margin"), State: "INACTIVE", StateChangedAt: t0.Add(9500 * time.Millisecond)},
		{Digest: d("changed-after"), State: "INACTIVE", StateChangedAt: t0.Add(11 * time.Second)},
		{Digest: d("not-handed-out"), State: "INACTIVE", StateChangedAt: t0},
	}
	sent := t0.Add(10 * time.Second)
	last := map[events.Digest]time.Time{}
	for _, s := range []string{"live", "dead-long-before", "revoked-before", "within-margin", "changed-after"} {
		last[d(s)] = sent
	}
	got := audit.HandedOutDead(rows, last, time.Second)
	if len(got) != 2 || got[0].Digest != d("dead-long-before") || got[1].Digest != d("revoked-before") {
		t.Fatalf("dead = %+v, want dead-long-before and revoked-before, oldest first", got)
	}
	if got := audit.HandedOutDead(rows, last, 0); len(got) != 3 {
		t.Fatalf("without a margin %d dead, want 3 (the change 0.5 s before counts)", len(got))
	}
}

func TestMaxPerWindowCountsDistinctTokens(t *testing.T) {
	w := 5 * time.Second
	t0 := time.UnixMilli(1_700_000_000_000).UTC() // a window start
	a, b, c := events.DigestOf("a"), events.DigestOf("b"), events.DigestOf("c")
	issues := []audit.Issue{
		// key k1: a shared by many requests, b and c in the same window.
		{Key: "k1", Digest: a, At: t0}, {Key: "k1", Digest: a, At: t0.Add(time.Second)},
		{Key: "k1", Digest: b, At: t0.Add(4999 * time.Millisecond)}, {Key: "k1", Digest: c, At: t0.Add(2 * time.Second)},
		// key k2: two tokens, one either side of a window edge.
		{Key: "k2", Digest: a, At: t0.Add(4999 * time.Millisecond)}, {Key: "k2", Digest: b, At: t0.Add(5 * time.Second)},
	}
	best, over := audit.MaxPerWindow(issues, w, 2)
	if best.Key != "k1" || best.Tokens != 3 || !best.Window.Equal(t0) || over != 1 {
		t.Fatalf("best=%+v over=%d, want k1 3 tokens at %s, 1 over", best, over, t0)
	}
	if best, over := audit.MaxPerWindow(issues[4:], w, 2); best.Tokens != 1 || over != 0 {
		t.Fatalf("edge: best=%+v over=%d, want 1 token per window", best, over)
	}
	if best, _ := audit.MaxPerWindow(nil, w, 2); best.Tokens != 0 {
		t.Fatalf("no issues: %+v", best)
	}
}

// TestClientVisibleAgainstRows checks the queries on real rows: the window
// count in SQL agrees with MaxPerWindow at window edges, refresh-grant rows
// are left out, and dead handouts are read from state and state_changed_at.
func TestClientVisibleAgainstRows(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	w := 5 * time.Second
	t0 := time.UnixMilli(1_700_000_000_000).UTC()
	type row struct {
		name, key, grant, state string
		issued, changed         time.Time
	}
	rows := []row{
		{"k1-a", "k1", "client_credentials", "INACTIVE", t0, t0.Add(time.Second)},
		{"k1-b", "k1", "client_credentials", "INACTIVE", t0.Add(4999 * time.Millisecond), t0.Add(6 * time.Second)},
		{"k1-c", "k1", "client_credentials", "ACTIVE", t0.Add(2 * time.Second), t0},
		{"k1-next", "k1", "client_credentials", "INACTIVE", t0.Add(w), t0},
		{"k2-a", "k2", "client_credentials", "REVOKED", t0.Add(4999 * time.Millisecond), t0},
		{"k2-b", "k2", "client_credentials", "ACTIVE", t0.Add(w), t0},
		// Refreshes rotate: four in one window are not churn.
		{"k3-r1", "k3", "refresh_token", "INACTIVE", t0, t0}, {"k3-r2", "k3", "refresh_token", "INACTIVE", t0, t0},
		{"k3-r3", "k3", "refresh_token", "INACTIVE", t0, t0}, {"k3-r4", "k3", "refresh_token", "ACTIVE", t0, t0},
		{"other", "k1", "client_credentials", "INACTIVE", t0, t0},
	}
	var issues []audit.Issue
	for i, r := range rows {
		client := "app"
		if r.name == "other" {
			client = "other-app"
		}
		dg := events.DigestOf(r.name)
		_, err := pool.Exec(ctx, `INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type, issued_at, expires_at, stream_seq, state_changed_at)
			VALUES ($1, $2, $2, $3, $4, $5, $6::timestamptz, $6::timestamptz + interval '1 hour', $7, $8)`,
			dg[:], client, r.key, r.state, r.grant, r.issued, i+1, r.changed)
		testenv.Must(t, err, "insert "+r.name)
		if r.grant != "refresh_token" && client == "app" {
			issues = append(issues, audit.Issue{Key: "app/app/" + r.key, Digest: events.DigestOf(r.name), At: r.issued})
		}
	}
	// Every token handed out by a request sent at t0+5.5 s.
	sent := t0.Add(5500 * time.Millisecond)
	last := map[events.Digest]time.Time{}
	for _, r := range rows {
		last[events.DigestOf(r.name)] = sent
	}
	o := audit.ClientOptions{DeadMargin: time.Second, Window: w, Bound: 2, ClientID: "app"}
	rep, err := audit.ClientVisible(ctx, pool, last, o)
	testenv.Must(t, err, "client visible")
	want, wantOver := audit.MaxPerWindow(issues, w, 2)
	if rep.MaxPerWindow != want || rep.OverBound != wantOver {
		t.Fatalf("SQL says %+v (%d over), MaxPerWindow says %+v (%d over)", rep.MaxPerWindow, rep.OverBound, want, wantOver)
	}
	if want.Key != "app/app/k1" || want.Tokens != 3 || !want.Window.Equal(t0) || wantOver != 1 {
		t.Fatalf("max = %+v over %d; want app/app/k1 with 3 tokens in the window at %s", want, wantOver, t0)
	}
	// Dead: changed at t0 or t0+1 s, more than 1 s before t0+5.5 s, and not
	// ACTIVE: k1-a, k1-next, k2-a, k3-r1..r3 and other (7). k1-b changed after.
	if rep.DeadCount != 7 || rep.HandedOut != len(rows) {
		t.Fatalf("dead = %d of %d, want 7: %+v", rep.DeadCount, rep.HandedOut, rep.Dead)
	}
	if rep.Clean() {
		t.Fatal("report clean with dead tokens and a key over the bound")
	}

	// All clients: "other" is another key, so the maximum stays.
	o.ClientID = ""
	all, err := audit.ClientVisible(ctx, pool, map[events.Digest]time.Time{}, o)
	testenv.Must(t, err, "client visible, all clients")
	if all.MaxPerWindow != want || all.DeadCount != 0 {
		t.Fatalf("all clients: %+v", all)
	}
	o.Since = t0.Add(w)
	later, err := audit.ClientVisible(ctx, pool, nil, o)
	testenv.Must(t, err, "client visible, since")
	if later.MaxPerWindow.Tokens != 1 || later.OverBound != 0 || !later.Clean() {
		t.Fatalf("since the next window: %+v", later)
	}
	o.Window = 0
	off, err := audit.ClientVisible(ctx, pool, nil, o)
	testenv.Must(t, err, "client visible, no window")
	if off.MaxPerWindow.Tokens != 0 || !off.Clean() {
		t.Fatalf("without a window: %+v", off)
	}
}
