package audit

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// The row invariants (one row per token, one ACTIVE per key) can hold while
// clients still suffer: a key whose tokens keep superseding each other hands
// every request a fresh token that deactivates the one before, and a token
// may be handed out after its row already said it was dead. These checks
// look at what clients received.

// DefaultDeadMargin is how much earlier than a request's send time a row's
// state_changed_at must be before the token counts as handed out dead.
//
// Writers stamp state_changed_at with now(), the start of their
// transaction, but the change becomes visible only at commit. An issuer that
// checked the token between the two read it ACTIVE and rightly handed it out,
// yet the row says it changed before the request was sent. Recovery's
// transaction (the usual writer of INACTIVE) holds row locks, waits for them
// behind persister batches of up to TOKENPIPE_BATCH_SIZE rows, and publishes
// its TokenDeactivated notices and waits for JetStream's acks before it
// commits: tens of milliseconds normally, a few hundred on a saturated
// 2-core machine. One second covers that with room, and a token handed out
// from a churning key or a stale check is typically seconds dead, so the
// margin costs little sensitivity.
const DefaultDeadMargin = time.Second

// DefaultWindowBound is the most distinct tokens one key may receive within
// one coalescing window: the window's coalesced token, plus one minted at
// random when a request finds a derived token already dead (or one token per
// request either side of a window boundary in the receive-time count).
const DefaultWindowBound = 2

// ClientOptions configures ClientVisible.
type ClientOptions struct {
	// DeadMargin: see DefaultDeadMargin.
	DeadMargin time.Duration
	// Window is the issuers' coalescing window (TOKENPIPE_COALESCE_WINDOW);
	// 0 skips the per-window count, since without coalescing every request
	// rightly gets a token of its own.
	Window time.Duration
	// Bound is the most distinct tokens a key may have per window.
	Bound int
	// ClientID restricts the per-window count to one client ("" for all).
	ClientID string
	// Since restricts the per-window count to rows issued at or after it
	// (zero for all rows).
	Since time.Time
}

// DeadHandout is a token a client received after its row had stopped being
// ACTIVE.
type DeadHandout struct {
	Digest         events.Digest `json:"digest"`
	State          string        `json:"state"`
	StateChangedAt time.Time     `json:"state_changed_at"`
	LastSent       time.Time     `json:"last_sent"` // send time of the last request that received it
}

// WindowCount is how many distinct tokens one key got in one window.
type WindowCount struct {
	Key    string    `json:"key"` // client/subject/scope
	Window time.Time `json:"window"`
	Tokens int       `json:"tokens"`
}

// ClientReport is what clients saw. The zero value is clean.
type ClientReport struct {
	HandedOut  int           `json:"tokens_handed_out"`
	DeadMargin time.Duration `json:"dead_margin"`
	Dead       []DeadHandout `json:"handed_out_dead"`
	DeadCount  int           `json:"handed_out_dead_count"`

	Window time.Duration `json:"coalesce_window"`
	Bound  int           `json:"window_bound"`
	// MaxPerWindow is the most token rows one key has in one window of
	// issued_at (the issuer sets a coalesced token's issued_at to its
	// window's start), and OverBound how many key-windows exceed Bound.
	MaxPerWindow WindowCount `json:"max_tokens_per_key_window"`
	OverBound    int         `json:"key_windows_over_bound"`
	// MaxReceived is the same count from what the client received, by
	// receive time, if the caller knows it (informational: a window of
	// receive time is not the issuer's window).
	MaxReceived *WindowCount `json:"max_received_per_key_window,omitempty"`
}

// Clean reports whether no token was handed out dead and no key exceeded
// the bound.
func (r *ClientReport) Clean() bool {
	return r.DeadCount == 0 && (r.Window <= 0 || r.OverBound == 0)
}

// Write prints the report for people, in the style of Report.Write.
func (r *ClientReport) Write(w io.Writer) {
	fmt.Fprintf(w, "tokens handed out:         %d\n", r.HandedOut)
	fmt.Fprintf(w, "handed out already dead:   %d (state changed over %s before the request)%s\n", r.DeadCount, r.DeadMargin, deadSample(r.Dead))
	if r.Window > 0 {
		fmt.Fprintf(w, "most tokens per key per %s window: %d (bound %d; %d key-windows over)%s\n",
			r.Window, r.MaxPerWindow.Tokens, r.Bound, r.OverBound, r.MaxPerWindow.where())
		if r.MaxReceived != nil {
			fmt.Fprintf(w, "most received per key per %s of receive time: %d%s\n", r.Window, r.MaxReceived.Tokens, r.MaxReceived.where())
		}
	} else {
		fmt.Fprintln(w, "tokens per key per window:  not checked (no coalescing window)")
	}
	if r.Clean() {
		fmt.Fprintln(w, "client-visible result: clean")
	} else {
		fmt.Fprintln(w, "client-visible result: VIOLATIONS")
	}
}

func (c WindowCount) where() string {
	if c.Tokens == 0 {
		return ""
	}
	return fmt.Sprintf(" (key %s, window %s)", c.Key, c.Window.UTC().Format("15:04:05.000"))
}

func deadSample(ds []DeadHandout) string {
	if len(ds) == 0 {
		return ""
	}
	d := ds[0]
	return fmt.Sprintf(" (e.g. %s %s %s before its last request)", d.Digest.String()[:12], d.State,
		d.LastSent.Sub(d.StateChangedAt).Round(time.Millisecond))
}

// RowState is what a token's row says of its liveness.
type RowState = store.RowState

// HandedOutDead returns the tokens whose row is not ACTIVE and changed state
// more than margin before the last request that received them was sent,
// oldest change first. Tokens without a row or not handed out are ignored.
func HandedOutDead(rows []RowState, lastSent map[events.Digest]time.Time, margin time.Duration) []DeadHandout {
	var out []DeadHandout
	for _, r := range rows {
		sent, ok := lastSent[r.Digest]
		if !ok || r.State == "ACTIVE" {
			continue
		}
		if r.StateChangedAt.Before(sent.Add(-margin)) {
			out = append(out, DeadHandout{Digest: r.Digest, State: r.State, StateChangedAt: r.StateChangedAt, LastSent: sent})
		}
	}
	slices.SortFunc(out, func(a, b DeadHandout) int {
		return cmp.Or(a.StateChangedAt.Compare(b.StateChangedAt), cmp.Compare(a.Digest.String(), b.Digest.String()))
	})
	return out
}

// Issue is one token of a key at a moment (its issued_at, or when it was
// received).
type Issue struct {
	Key    string
	Digest events.Digest
	At     time.Time
}

// WindowStart is the start of the coalescing window holding t, cut the way
// the issuer cuts it: whole multiples of the window in Unix milliseconds.
func WindowStart(t time.Time, window time.Duration) time.Time {
	w := window.Milliseconds()
	ms := t.UnixMilli()
	n := ms / w
	if ms < 0 && ms%w != 0 {
		n-- // floor, not truncation, before 1970
	}
	return time.UnixMilli(n * w).UTC()
}

// MaxPerWindow counts the distinct tokens of each key in each window and
// returns the largest count (ties: earliest window, then key) and how many
// key-windows hold more than bound.
func MaxPerWindow(issues []Issue, window time.Duration, bound int) (WindowCount, int) {
	type kw struct {
		key string
		w   int64
	}
	seen := map[kw]map[events.Digest]bool{}
	for _, is := range issues {
		k := kw{is.Key, WindowStart(is.At, window).UnixMilli()}
		if seen[k] == nil {
			seen[k] = map[events.Digest]bool{}
		}
		seen[k][is.Digest] = true
	}
	var best WindowCount
	over := 0
	for k, ds := range seen {
		n := len(ds)
		if n > bound {
			over++
		}
		c := WindowCount{Key: k.key, Window: time.UnixMilli(k.w).UTC(), Tokens: n}
		if n > best.Tokens || n == best.Tokens && (c.Window.Before(best.Window) || c.Window.Equal(best.Window) && c.Key < best.Key) {
			best = c
		}
	}
	return best, over
}

// The table's key-windows (store.BusiestWindow) use the same cut as
// WindowStart.

// WindowMax returns the key-window with the most token rows and how many
// key-windows exceed o.Bound, from the table.
func WindowMax(ctx context.Context, pool *pgxpool.Pool, o ClientOptions) (WindowCount, int, error) {
	if o.Window <= 0 {
		return WindowCount{}, 0, nil
	}
	if o.Window%time.Millisecond != 0 {
		return WindowCount{}, 0, fmt.Errorf("coalescing window %s: not a whole number of milliseconds", o.Window)
	}
	since := o.Since
	if since.IsZero() {
		since = time.Unix(0, 0)
	}
	kw, ok, err := store.BusiestWindow(ctx, pool, o.Window.Milliseconds(), o.ClientID, since, o.Bound)
	if err != nil {
		return WindowCount{}, 0, fmt.Errorf("audit tokens per window: %w", err)
	}
	if !ok {
		return WindowCount{}, 0, nil
	}
	k := kw.Key
	c := WindowCount{Key: k.ClientID + "/" + k.Subject + "/" + k.Scope, Window: time.UnixMilli(kw.StartMs).UTC(), Tokens: kw.Tokens}
	return c, kw.Over, nil
}

// RowStates reads the state of the given tokens' rows.
func RowStates(ctx context.Context, pool *pgxpool.Pool, digests []events.Digest) ([]RowState, error) {
	var out []RowState
	const chunk = 10000
	for lo := 0; lo < len(digests); lo += chunk {
		part := digests[lo:min(lo+chunk, len(digests))]
		states, err := store.RowStates(ctx, pool, part)
		if err != nil {
			return nil, fmt.Errorf("audit token states: %w", err)
		}
		out = append(out, states...)
	}
	return out, nil
}

// ClientVisible checks what clients received: lastSent maps each token
// handed out to the send time of the last request that received it. Run it
// once every token has its row (after a clean Check with nothing pending):
// a token without a row yet cannot be judged and is not counted dead.
func ClientVisible(ctx context.Context, pool *pgxpool.Pool, lastSent map[events.Digest]time.Time, o ClientOptions) (*ClientReport, error) {
	r := &ClientReport{HandedOut: len(lastSent), DeadMargin: o.DeadMargin, Window: o.Window, Bound: o.Bound}
	digests := make([]events.Digest, 0, len(lastSent))
	for d := range lastSent {
		digests = append(digests, d)
	}
	states, err := RowStates(ctx, pool, digests)
	if err != nil {
		return nil, err
	}
	r.Dead = HandedOutDead(states, lastSent, o.DeadMargin)
	r.DeadCount = len(r.Dead)
	if len(r.Dead) > 10 { // a sample is enough to look into; the count says how bad
		r.Dead = r.Dead[:10]
	}
	if r.MaxPerWindow, r.OverBound, err = WindowMax(ctx, pool, o); err != nil {
		return nil, err
	}
	return r, nil
}
