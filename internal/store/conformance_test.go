package store_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/replay"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/recovery"
)

// The conformance suite: every writer of token rows, fed the same sequence
// of events and revocations, must leave the same final states. A writer
// that disagrees with the table (or with the others) breaks the rule that
// the newest token of a key decides it and that a revocation wins every race.

// tok is one token of a scenario: its key (user and scope at the scenario's
// client), original stream sequence and family.
type tok struct {
	user, scope string
	seq         uint64
	family      string // "" for none
}

// step is one thing that happens: a batch of deliveries (names of toks,
// delivered together), or a revocation.
type step struct {
	deliver     []string
	revokeToken string
	revokeFam   string
	revokeGrant *grant
	// exchange records the named token's exchange (per-request rotation),
	// answered, with its batch window still open; exchangeClosed, with the
	// window already past.
	exchange, exchangeClosed string
	// exchangeUnanswered records an exchange whose caller never got the
	// answer: the window has not started. successor names the token the
	// exchange minted (its grant and issue time made so), if any.
	exchangeUnanswered, successor string
}

type grant struct {
	user string // "" for every user of the client
	upTo uint64
}

type scenario struct {
	name  string
	toks  map[string]tok
	steps []step
	want  map[string]string // token name -> final state
	// streamOnly: the outcome depends on stream sequences, which sync-mode
	// rows do not have: the sync issuer orders a key's tokens by arrival,
	// and a grant watermark never covers its rows (they exist before any
	// later revocation looks for them).
	streamOnly bool
}

func d(names ...string) step { return step{deliver: names} }

var scenarios = []scenario{
	{name: "issue", toks: map[string]tok{"a": {"u", "read", 1, ""}},
		steps: []step{d("a")}, want: map[string]string{"a": "ACTIVE"}},
	{name: "redeliver", toks: map[string]tok{"a": {"u", "read", 1, ""}},
		steps: []step{d("a"), d("a"), d("a")}, want: map[string]string{"a": "ACTIVE"}},
	{name: "newer replaces older", toks: map[string]tok{"a": {"u", "read", 1, ""}, "b": {"u", "read", 2, ""}},
		steps: []step{d("a"), d("b")}, want: map[string]string{"a": "INACTIVE", "b": "ACTIVE"}},
	{name: "older arrives late", toks: map[string]tok{"a": {"u", "read", 1, ""}, "b": {"u", "read", 2, ""}},
		steps: []step{d("b"), d("a")}, want: map[string]string{"a": "INACTIVE", "b": "ACTIVE"}, streamOnly: true},
	{name: "conflicting key in one batch", toks: map[string]tok{"a": {"u", "read", 1, ""}, "b": {"u", "read", 2, ""}, "c": {"u", "read", 3, ""}},
		steps: []step{d("c", "a", "b")}, want: map[string]string{"a": "INACTIVE", "b": "INACTIVE", "c": "ACTIVE"}, streamOnly: true},
	{name: "redelivered older after newer", toks: map[string]tok{"a": {"u", "read", 1, ""}, "b": {"u", "read", 2, ""}},
		steps: []step{d("a"), d("b"), d("a", "b")}, want: map[string]string{"a": "INACTIVE", "b": "ACTIVE"}},
	{name: "keys are independent", toks: map[string]tok{"a": {"u", "read", 1, ""}, "b": {"v", "read", 2, ""}, "c": {"u", "read write", 3, ""}},
		steps: []step{d("a", "b"), d("c")}, want: map[string]string{"a": "ACTIVE", "b": "ACTIVE", "c": "ACTIVE"}},
	{name: "revoke before persist", toks: map[string]tok{"a": {"u", "read", 1, ""}},
		steps: []step{{revokeToken: "a"}, d("a")}, want: map[string]string{"a": "REVOKED"}},
	{name: "revoke after persist", toks: map[string]tok{"a": {"u", "read", 1, ""}},
		steps: []step{d("a"), {revokeToken: "a"}, d("a")}, want: map[string]string{"a": "REVOKED"}},
	{name: "revoked newest, older arrives late", toks: map[string]tok{"a": {"u", "read", 1, ""}, "b": {"u", "read", 2, ""}},
		steps: []step{d("b"), {revokeToken: "b"}, d("a")}, want: map[string]string{"a": "INACTIVE", "b": "REVOKED"}, streamOnly: true},
	{name: "family revoked while queued", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, ""}},
		steps: []step{{revokeFam: "f"}, d("a", "b")}, want: map[string]string{"a": "REVOKED", "b": "ACTIVE"}},
	{name: "family revoked after persist", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{d("a"), {revokeFam: "f"}, d("b")}, want: map[string]string{"a": "REVOKED", "b": "REVOKED"}},
	{name: "grant revoked while queued", toks: map[string]tok{"a": {"u", "read", 3, ""}, "b": {"u", "read", 7, ""}, "c": {"v", "read", 4, ""}},
		steps: []step{{revokeGrant: &grant{"u", 5}}, d("a", "b", "c")}, want: map[string]string{"a": "REVOKED", "b": "ACTIVE", "c": "ACTIVE"}, streamOnly: true},
	{name: "grant of every user revoked after persist", toks: map[string]tok{"a": {"u", "read", 1, ""}, "b": {"v", "read", 2, ""}, "c": {"u", "read", 3, ""}},
		steps: []step{d("a", "b"), {revokeGrant: &grant{"", 2}}, d("c")}, want: map[string]string{"a": "REVOKED", "b": "REVOKED", "c": "ACTIVE"}},
	{name: "grant revoked over an active older token", toks: map[string]tok{"a": {"u", "read", 1, ""}, "b": {"u", "read", 4, ""}},
		steps: []step{d("a"), {revokeGrant: &grant{"u", 5}}, d("b")}, want: map[string]string{"a": "REVOKED", "b": "REVOKED"}, streamOnly: true},
	// A refresh that raced with the grant revocation minted b from a's
	// family past the watermark: writing a REVOKED revokes its family too.
	{name: "grant revoked while a family member was queued", toks: map[string]tok{"a": {"u", "read", 3, "f"}, "b": {"u", "read", 7, "f"}},
		steps: []step{{revokeGrant: &grant{"u", 5}}, d("a"), d("b")}, want: map[string]string{"a": "REVOKED", "b": "REVOKED"}, streamOnly: true},
}

// Per-request rotation: a successor (same family, higher sequence) is an
// ordinary newer token to every writer; the exchange record decides only
// how its predecessor's INACTIVE row reads (store.AccessStatus.Effective).
var exchangeScenarios = []scenario{
	{name: "exchange: successor supersedes, predecessor rotated", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchange: "a"}, d("a"), d("b")}, want: map[string]string{"a": "ROTATED", "b": "ACTIVE"}},
	{name: "exchange: successor arrives first", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchange: "a"}, d("b"), d("a")}, want: map[string]string{"a": "ROTATED", "b": "ACTIVE"}, streamOnly: true},
	{name: "exchange: a chain in one batch", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}, "c": {"u", "read", 3, "f"}},
		steps: []step{{exchange: "a"}, {exchange: "b"}, d("c", "a", "b")}, want: map[string]string{"a": "ROTATED", "b": "ROTATED", "c": "ACTIVE"}, streamOnly: true},
	{name: "exchange: another sign-in takes the key", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}, "c": {"u", "read", 3, "g"}},
		steps: []step{{exchange: "a"}, d("a"), d("b"), d("c")}, want: map[string]string{"a": "INACTIVE", "b": "INACTIVE", "c": "ACTIVE"}},
	{name: "exchange: window passed while the successor is queued", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchangeClosed: "a"}, d("a")}, want: map[string]string{"a": "INACTIVE", "b": "QUEUED"}},
	{name: "exchange: window passed", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchangeClosed: "a"}, d("a", "b")}, want: map[string]string{"a": "INACTIVE", "b": "ACTIVE"}},
	{name: "exchange never answered: the predecessor lives on", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchangeUnanswered: "a", successor: "b"}, d("a"), d("b")}, want: map[string]string{"a": "ROTATED", "b": "ACTIVE"}},
	// b is not a's successor (a refresh of the family): nobody was given
	// a's successor, so nothing keeps a alive past b.
	{name: "exchange never answered: a refresh of the family supersedes", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchangeUnanswered: "a"}, d("a"), d("b")}, want: map[string]string{"a": "INACTIVE", "b": "ACTIVE"}},
	{name: "exchange: revoked predecessor stays revoked", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchange: "a"}, d("a"), {revokeToken: "a"}, d("b")}, want: map[string]string{"a": "REVOKED", "b": "ACTIVE"}},
	{name: "exchange: grant revocation kills both", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchange: "a"}, d("a"), d("b"), {revokeGrant: &grant{"u", 5}}}, want: map[string]string{"a": "REVOKED", "b": "REVOKED"}},
	{name: "exchange: family revocation kills both, queued successor included", toks: map[string]tok{"a": {"u", "read", 1, "f"}, "b": {"u", "read", 2, "f"}},
		steps: []step{{exchange: "a"}, d("a"), {revokeFam: "f"}, d("b")}, want: map[string]string{"a": "REVOKED", "b": "REVOKED"}},
}

// writer applies one batch of rows the way one writer of the pipeline does.
type writer struct {
	name  string
	write func(ctx context.Context, t *testing.T, rows []store.Row)
	sync  bool // plays only the scenarios that are not streamOnly
}

func noNotice([]recovery.Superseded) error { return nil }

func writers(pool *pgxpool.Pool, w *replay.Writer) []writer {
	return []writer{
		// The persister's batch write, with conflicts handed to recovery as
		// the conflict subject does.
		{name: "persister", write: func(ctx context.Context, t *testing.T, rows []store.Row) {
			out, err := store.WriteBatch(ctx, pool, rows)
			testenv.Must(t, err, "write batch")
			var conflicts []store.Row
			for i, o := range out {
				if o == store.Conflict {
					conflicts = append(conflicts, rows[i])
				}
			}
			if len(conflicts) > 0 {
				_, err := recovery.Apply(ctx, pool, conflicts, noNotice)
				testenv.Must(t, err, "resolve conflicts")
			}
		}},
		// The same, one row per batch: batching must not change the outcome.
		{name: "persister row by row", write: func(ctx context.Context, t *testing.T, rows []store.Row) {
			for _, r := range rows {
				out, err := store.WriteBatch(ctx, pool, []store.Row{r})
				testenv.Must(t, err, "write row")
				if out[0] == store.Conflict {
					_, err := recovery.Apply(ctx, pool, []store.Row{r}, noNotice)
					testenv.Must(t, err, "resolve conflict")
				}
			}
		}},
		// Recovery alone gives every event a row, conflicting or not.
		{name: "recovery", write: func(ctx context.Context, t *testing.T, rows []store.Row) {
			_, err := recovery.Apply(ctx, pool, rows, noNotice)
			testenv.Must(t, err, "apply")
		}},
		{name: "replay", write: func(ctx context.Context, t *testing.T, rows []store.Row) {
			res, err := w.Write(ctx, rows)
			testenv.Must(t, err, "replay write")
			if len(res.Rejected) > 0 {
				t.Fatalf("replay rejected %v", res.Rejected)
			}
		}},
		// The issuer in sync mode writes each token in its request, in
		// arrival order, without a stream sequence.
		{name: "sync issuer", sync: true, write: func(ctx context.Context, t *testing.T, rows []store.Row) {
			for _, r := range rows {
				_, err := store.WriteSync(ctx, pool, r.Event)
				testenv.Must(t, err, "sync write")
			}
		}},
	}
}

func TestWritersConform(t *testing.T) {
	_, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	rw := &replay.Writer{DB: pool, JS: js, Topology: topo, Retry: store.DefaultRetryPolicy(), Log: testenv.Logger(t)}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, w := range writers(pool, rw) {
		for _, sc := range slices.Concat(scenarios, exchangeScenarios) {
			if w.sync && sc.streamOnly {
				continue
			}
			t.Run(w.name+"/"+sc.name, func(t *testing.T) {
				got := run(ctx, t, pool, w, sc)
				if !equal(got, sc.want) {
					t.Errorf("final states %s, want %s", show(got), show(sc.want))
				}
			})
		}
	}
}

// run plays a scenario at a client of its own and returns the final state
// of each token.
func run(ctx context.Context, t *testing.T, pool *pgxpool.Pool, w writer, sc scenario) map[string]string {
	client := testenv.Name("conform_")
	evs := map[string]*events.TokenIssued{}
	families := map[string]tokens.Family{}
	family := func(name string) tokens.Family {
		if _, ok := families[name]; !ok {
			var f tokens.Family
			_, _ = rand.Read(f[:])
			families[name] = f
		}
		return families[name]
	}
	for name, tk := range sc.toks {
		ev := testenv.Token(client, tk.user, strings.Fields(tk.scope)...)
		if tk.family != "" {
			f := family(tk.family)
			ev.FamilyID = &f
		}
		evs[name] = ev
	}
	for _, s := range sc.steps {
		switch {
		case s.deliver != nil:
			rows := make([]store.Row, len(s.deliver))
			for i, name := range s.deliver {
				rows[i] = store.Row{Event: evs[name], Seq: sc.toks[name].seq}
			}
			w.write(ctx, t, rows)
		case s.revokeToken != "":
			ev := evs[s.revokeToken]
			var f tokens.Family
			if ev.FamilyID != nil {
				f = *ev.FamilyID
			}
			_, err := store.RevokeToken(ctx, pool, ev.TokenDigest, tokens.Claims{
				Grant: ev.GrantType, ClientID: ev.ClientID, Subject: ev.Subject, Scope: ev.Scope(),
				IssuedAt: ev.IssuedAt, ExpiresAt: ev.ExpiresAt, Family: f,
			})
			testenv.Must(t, err, "revoke token")
		case s.revokeFam != "":
			_, err := store.RevokeFamily(ctx, pool, family(s.revokeFam), "test")
			testenv.Must(t, err, "revoke family")
		case s.revokeGrant != nil:
			_, err := store.RevokeGrant(ctx, pool, client, s.revokeGrant.user, s.revokeGrant.upTo, "test")
			testenv.Must(t, err, "revoke grant")
		case s.exchange != "":
			recordExchange(ctx, t, pool, evs[s.exchange], time.Hour)
		case s.exchangeClosed != "":
			recordExchange(ctx, t, pool, evs[s.exchangeClosed], 0)
		case s.exchangeUnanswered != "":
			recordExchange(ctx, t, pool, evs[s.exchangeUnanswered], -1)
			if s.successor != "" {
				x, _, err := store.ReadExchange(ctx, pool, evs[s.exchangeUnanswered].TokenDigest)
				testenv.Must(t, err, "read exchange")
				evs[s.successor].GrantType, evs[s.successor].IssuedAt = tokens.GrantTokenExchange, x.At
			}
		}
	}
	states, err := store.EffectiveStates(ctx, pool)
	testenv.Must(t, err, "effective states")
	got := map[string]string{}
	for name, ev := range evs {
		state, ok := states[ev.TokenDigest]
		if !ok {
			state = "QUEUED" // no row: the scenario never delivered it
		}
		got[name] = state
	}
	var rows int
	testenv.Must(t, pool.QueryRow(ctx, `SELECT count(*) FROM tokens WHERE client_id = $1`, client).Scan(&rows), "count rows")
	if want := len(evs) - countQueued(sc.want); rows != want {
		t.Errorf("%d rows for %d delivered tokens", rows, want)
	}
	return got
}

func countQueued(want map[string]string) int {
	n := 0
	for _, s := range want {
		if s == "QUEUED" {
			n++
		}
	}
	return n
}

// recordExchange records ev's exchange as the issuer does, answered, with
// the given batch window; a negative window leaves it unanswered.
func recordExchange(ctx context.Context, t *testing.T, pool *pgxpool.Pool, ev *events.TokenIssued, window time.Duration) {
	t.Helper()
	_, _, err := store.RecordExchange(ctx, pool, ev.TokenDigest, ev.ExpiresAt)
	testenv.Must(t, err, "record exchange")
	if window >= 0 {
		testenv.Must(t, store.MarkExchangeAnswered(ctx, pool, ev.TokenDigest, window), "mark exchange answered")
	}
}

func equal(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func show(m map[string]string) string {
	var parts []string
	for k, v := range m {
		parts = append(parts, fmt.Sprintf("%s=%s", k, v))
	}
	slices.Sort(parts)
	return strings.Join(parts, " ")
}
