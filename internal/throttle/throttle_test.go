package throttle

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time                 { return c.t }
func (c *clock) add(d time.Duration)            { c.t = c.t.Add(d) }
func newClock() *clock                          { return &clock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }
func testLimiter(c *clock, cfg Config) *Limiter { cfg.Now = c.now; return New(cfg) }

// fail makes n failed tries and fails the test if one is refused.
func fail(t *testing.T, l *Limiter, user, source string, n int) {
	t.Helper()
	for i := range n {
		a, r := l.Begin(user, source)
		if r != nil {
			t.Fatalf("try %d of %s from %s refused: %+v", i+1, user, source, r)
		}
		a.Failed()
	}
}

func refused(t *testing.T, l *Limiter, user, source string) *Refusal {
	t.Helper()
	a, r := l.Begin(user, source)
	if r == nil {
		a.Abandon()
		t.Fatalf("%s from %s let through, want refused", user, source)
	}
	return r
}

func allowed(t *testing.T, l *Limiter, user, source string) *Attempt {
	t.Helper()
	a, r := l.Begin(user, source)
	if r != nil {
		t.Fatalf("%s from %s refused: %+v", user, source, r)
	}
	return a
}

func TestBackoffDoublesUpToTheCapAndEnds(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{PerUserSource: 3, Backoff: time.Second, MaxBackoff: 5 * time.Second})
	fail(t, l, "alice", "a", 3)
	if r := refused(t, l, "alice", "a"); r.Limit != LimitUserSource || r.RetryAfter != time.Second {
		t.Fatalf("after 3 failures: %+v, want user_source for 1s", r)
	}
	prev := time.Second
	for _, want := range []time.Duration{2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second} {
		c.add(prev - time.Millisecond)
		refused(t, l, "alice", "a")
		c.add(time.Millisecond)
		fail(t, l, "alice", "a", 1)
		if r := refused(t, l, "alice", "a"); r.RetryAfter != want {
			t.Fatalf("back-off = %v, want %v", r.RetryAfter, want)
		}
		prev = want
	}
	// The right password, once the back-off has passed, is let through and
	// starts the count again.
	c.add(time.Hour)
	allowed(t, l, "alice", "a").Succeeded()
	fail(t, l, "alice", "a", 3)
}

func TestOtherUsersAndSourcesAreUnaffected(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{PerUserSource: 2, PerUser: 10, PerSource: 10})
	fail(t, l, "alice", "a", 2)
	refused(t, l, "alice", "a")
	allowed(t, l, "bob", "a").Succeeded()
	allowed(t, l, "alice", "b").Succeeded()
	// alice signing in from b does not lift the lock on a: that is the
	// attacker's source.
	refused(t, l, "alice", "a")
}

func TestPerUserLimitSparesKnownSources(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{PerUserSource: 5, PerUser: 6, PerSource: 100})
	allowed(t, l, "alice", "home").Succeeded()
	for i := range 6 {
		fail(t, l, "alice", fmt.Sprintf("bot%d", i), 1)
	}
	if r := refused(t, l, "alice", "elsewhere"); r.Limit != LimitUser {
		t.Fatalf("refusal %+v, want by the per-user limit", r)
	}
	// Her usual place is exempt, and her sign-in there lifts the user lock.
	allowed(t, l, "alice", "home").Succeeded()
	allowed(t, l, "alice", "elsewhere").Abandon()
}

func TestPerSourceLimitAndSuccessDoesNotResetIt(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{PerUserSource: 5, PerUser: 100, PerSource: 4})
	for i := range 3 {
		fail(t, l, fmt.Sprintf("user%d", i), "sprayer", 1)
	}
	// The sprayer's own account signs in: the count of guesses at others stays.
	allowed(t, l, "mine", "sprayer").Succeeded()
	fail(t, l, "user9", "sprayer", 1)
	if r := refused(t, l, "user10", "sprayer"); r.Limit != LimitSource {
		t.Fatalf("refusal %+v, want by the per-source limit", r)
	}
	allowed(t, l, "user10", "elsewhere").Abandon()
}

func TestConcurrentTriesCountAgainstTheFreeFailures(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{PerUserSource: 3})
	var held []*Attempt
	for range 3 {
		held = append(held, allowed(t, l, "alice", "a"))
	}
	refused(t, l, "alice", "a")
	for _, a := range held {
		a.Failed()
	}
	refused(t, l, "alice", "a")
	c.add(DefaultBackoff)
	// Past the free failures: one try at a time.
	a := allowed(t, l, "alice", "a")
	refused(t, l, "alice", "a")
	a.Abandon()
	allowed(t, l, "alice", "a").Abandon()
}

func TestFailuresAreForgottenAfterMemory(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{PerUserSource: 3, Memory: time.Hour})
	fail(t, l, "alice", "a", 2)
	c.add(time.Hour)
	fail(t, l, "alice", "a", 2) // would be 4 > 3 if the first two counted
	allowed(t, l, "alice", "a").Abandon()
	if n := l.Len(); n != 3 {
		t.Fatalf("tracked %d keys, want 3", n)
	}
	c.add(time.Hour)
	allowed(t, l, "bob", "b").Abandon()
	if n := l.Len(); n != 0 {
		t.Fatalf("tracked %d keys after everything was forgotten, want 0", n)
	}
}

func TestMemoryIsBounded(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{MaxEntries: 100})
	allowed(t, l, "alice", "home").Succeeded()
	for i := range 1000 {
		fail(t, l, fmt.Sprintf("random%d", i), fmt.Sprintf("10.0.%d.%d", i/256, i%256), 1)
		if n := l.Len(); n > 100 {
			t.Fatalf("tracked %d keys, limit 100", n)
		}
	}
	// Nothing is held against anyone for good: the oldest went first.
	allowed(t, l, "random0", "10.0.0.0").Abandon()
}

func TestAbandonedTriesCountForNothing(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{PerUserSource: 1})
	for range 10 {
		allowed(t, l, "alice", "a").Abandon()
	}
	if n := l.Len(); n != 0 {
		t.Fatalf("tracked %d keys after abandoned tries", n)
	}
	a := allowed(t, l, "alice", "a")
	a.Failed()
	a.Failed() // a second verdict is ignored
	c.add(DefaultBackoff)
	allowed(t, l, "alice", "a").Succeeded()
}

func TestConcurrentUse(t *testing.T) {
	l := New(Config{PerUserSource: 1000, PerUser: 1000, PerSource: 1000, MaxEntries: 50})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 500 {
				a, r := l.Begin(fmt.Sprintf("u%d", i%70), fmt.Sprintf("s%d", g))
				if r != nil {
					continue
				}
				switch i % 3 {
				case 0:
					a.Failed()
				case 1:
					a.Succeeded()
				default:
					a.Abandon()
				}
			}
		}()
	}
	wg.Wait()
	if n := l.Len(); n > 50 {
		t.Fatalf("tracked %d keys, limit 50", n)
	}
}

func TestPoolRejectsAfterTheWait(t *testing.T) {
	p := NewPool(2, 20*time.Millisecond)
	ctx := context.Background()
	r1, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := p.Acquire(ctx); !errors.Is(err, ErrBusy) {
		t.Fatalf("third acquire: %v, want ErrBusy", err)
	}
	// Only the lower bound: a busy machine may wake the waiter late, which
	// is no fault, but refusing before the wait is over would be.
	if waited := time.Since(start); waited < 20*time.Millisecond {
		t.Fatalf("refused after %v, before the 20ms wait", waited)
	}
	// A slot freed during the wait is taken. The pool waits far longer than
	// anything a busy machine delays the release by; only a hang reaches it.
	long := NewPool(2, time.Minute)
	l1, err := long.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l2, err := long.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(5 * time.Millisecond); l1() }()
	l3, err := long.Acquire(ctx)
	if err != nil {
		t.Fatalf("acquire while a slot is freed: %v", err)
	}
	l2()
	l3()
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := p.Acquire(cctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("acquire with a cancelled context: %v", err)
	}
	r2()
	r1()
	if NewPool(0, 0).Size() != DefaultPoolSize() || DefaultPoolSize() < 1 {
		t.Fatal("default pool size")
	}
}

func TestPoolDoRunsOnALowerPriorityThread(t *testing.T) {
	p := NewPool(1, 0)
	ran := false
	if err := p.Do(context.Background(), func() { ran = true }); err != nil || !ran {
		t.Fatalf("Do: ran=%v err=%v", ran, err)
	}
	hold, _ := p.Acquire(context.Background())
	if err := p.Do(context.Background(), func() { t.Error("ran without a slot") }); !errors.Is(err, ErrBusy) {
		t.Fatalf("Do on a full pool: %v", err)
	}
	hold()
	defer func() {
		if r := recover(); r != "boom" {
			t.Fatalf("recovered %v, want the panic of f", r)
		}
		if release, err := p.Acquire(context.Background()); err != nil {
			t.Fatal("a panicking f kept its slot")
		} else {
			release()
		}
	}()
	_ = p.Do(context.Background(), func() { panic("boom") })
}

// TestInFlightTriesDoNotEvictFailures: tries that are only in flight (waiting
// for a hashing slot, then abandoned when none frees) cost an attacker no
// hashing. A flood of them from fresh names must not push out the failures
// and back-off held against a user, or the throttle resets for free.
func TestInFlightTriesDoNotEvictFailures(t *testing.T) {
	c := newClock()
	l := testLimiter(c, Config{MaxEntries: 50})
	fail(t, l, "alice", "attacker", DefaultPerUserSource)
	refused(t, l, "alice", "attacker")
	// Failures of others, tracked after alice's: however many there are,
	// tries in flight go first.
	for i := range 20 {
		fail(t, l, fmt.Sprintf("other%d", i), "elsewhere", 1)
	}
	var held []*Attempt
	for i := range 200 {
		held = append(held, allowed(t, l, fmt.Sprintf("random%d", i), fmt.Sprintf("10.0.%d.%d", i/256, i%256)))
		if n := l.Len(); n > 50 {
			t.Fatalf("tracked %d keys, limit 50", n)
		}
	}
	for _, a := range held {
		a.Abandon()
	}
	refused(t, l, "alice", "attacker")
}
