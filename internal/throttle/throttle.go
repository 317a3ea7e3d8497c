// Package throttle slows down online password guessing: it counts failed
// sign-ins by (user, source), by user and by source, and after a number of
// free failures refuses further tries for an exponentially growing back-off.
// Nothing here is permanent: every refusal ends after at most MaxBackoff,
// and failures are forgotten Memory after the last one, so an attacker can
// delay a user's sign-in but not lock the user out for good. A source the
// user signed in from before is exempt from the looser per-user and
// per-source limits, so an attack from elsewhere does not lock the user out
// of their usual place at all.
//
// The state is in memory, per process, and bounded: at most MaxEntries keys
// are tracked and the least recently used is dropped first (entries holding
// only tries in flight before those holding failures), so random user names
// or addresses cannot grow it, nor cheaply flush what failures built up. With several issuers behind a load
// balancer each counts for itself: an attacker gets up to that many times
// the tries.
package throttle

import (
	"container/list"
	"sync"
	"time"
)

// Defaults for Config fields left zero.
const (
	DefaultPerUserSource = 5
	DefaultPerUser       = 20
	DefaultPerSource     = 50
	DefaultBackoff       = time.Second
	DefaultMaxBackoff    = 15 * time.Minute
	DefaultMemory        = time.Hour
	DefaultKnownFor      = 7 * 24 * time.Hour
	DefaultMaxEntries    = 100_000
)

// Config tunes a Limiter. Zero fields take the defaults above.
type Config struct {
	// PerUserSource is how many failures one user may have from one source
	// before each further try waits for the back-off.
	PerUserSource int
	// PerUser counts one user's failures from every source: looser, against
	// guessing spread over many addresses.
	PerUser int
	// PerSource counts one source's failures over every user: against one
	// address trying a few passwords on many users.
	PerSource int
	// Backoff is the wait after the last free failure; it doubles with each
	// further failure up to MaxBackoff.
	Backoff    time.Duration
	MaxBackoff time.Duration
	// Memory is how long failures are remembered after the last one.
	Memory time.Duration
	// KnownFor is how long a source a user signed in from stays exempt from
	// that user's and that source's looser limits (PerUser, PerSource).
	KnownFor time.Duration
	// MaxEntries bounds the keys tracked.
	MaxEntries int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

func (c Config) withDefaults() Config {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	defDur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.PerUserSource, DefaultPerUserSource)
	def(&c.PerUser, DefaultPerUser)
	def(&c.PerSource, DefaultPerSource)
	def(&c.MaxEntries, DefaultMaxEntries)
	defDur(&c.Backoff, DefaultBackoff)
	defDur(&c.MaxBackoff, DefaultMaxBackoff)
	defDur(&c.Memory, DefaultMemory)
	defDur(&c.KnownFor, DefaultKnownFor)
	c.MaxBackoff = max(c.MaxBackoff, c.Backoff)
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// Limit names the limit that refused a try.
type Limit string

// The limits, as metric label values.
const (
	LimitUserSource Limit = "user_source"
	LimitUser       Limit = "user"
	LimitSource     Limit = "source"
)

type kind uint8

const (
	kindUserSource kind = iota
	kindUser
	kindSource
)

type key struct {
	kind         kind
	user, source string
}

type entry struct {
	key      key
	failures int
	inflight int       // tries begun and not yet judged
	lastFail time.Time // failures are forgotten Memory after this
	locked   time.Time // no try before this
	known    time.Time // (user, source) only: signed in from here; exempt until this
	costly   bool      // in Limiter.costly, not Limiter.lru
}

// Limiter decides whether a sign-in may be tried. It is safe for concurrent
// use.
type Limiter struct {
	cfg Config

	mu      sync.Mutex
	entries map[key]*list.Element // of *entry
	// Two recency lists, most recently used first: lru for entries that
	// hold only tries in flight, costly for those holding a failure, a
	// back-off or a known source. A full limiter drops from lru first:
	// tries in flight cost an attacker nothing when they end unjudged (no
	// hashing slot), and must not push out what failed tries, each a hash,
	// built up.
	lru    *list.List
	costly *list.List
}

// New returns a Limiter.
func New(cfg Config) *Limiter {
	return &Limiter{cfg: cfg.withDefaults(), entries: map[key]*list.Element{}, lru: list.New(), costly: list.New()}
}

// Refusal says a try was refused, by which limit, and when to come back.
type Refusal struct {
	Limit      Limit
	RetryAfter time.Duration
}

// Attempt is a try let through by Begin. Exactly one of Failed, Succeeded
// and Abandon must be called when its password has been checked (or could
// not be).
type Attempt struct {
	l      *Limiter
	keys   []key
	limits []int
	held   []*entry // the entries whose inflight counts this attempt
	done   bool
}

// Begin asks whether user may try a password from source. Tries still being
// checked count against the free failures, so a burst of concurrent guesses
// gets no more tries than a sequence would; past the free failures, one try
// at a time once the back-off has passed.
func (l *Limiter) Begin(user, source string) (*Attempt, *Refusal) {
	now := l.cfg.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	a := &Attempt{l: l}
	pair := key{kindUserSource, user, source}
	a.keys, a.limits = append(a.keys, pair), append(a.limits, l.cfg.PerUserSource)
	if e := l.get(pair, now); e == nil || !now.Before(e.known) {
		a.keys = append(a.keys, key{kind: kindUser, user: user}, key{kind: kindSource, source: source})
		a.limits = append(a.limits, l.cfg.PerUser, l.cfg.PerSource)
	}
	var refusal *Refusal
	for i, k := range a.keys {
		e := l.get(k, now)
		if e == nil {
			continue
		}
		if wait := l.wait(e, a.limits[i], now); wait > 0 && (refusal == nil || wait > refusal.RetryAfter) {
			refusal = &Refusal{Limit: limitOf(k.kind), RetryAfter: wait}
		}
	}
	if refusal != nil {
		return nil, refusal
	}
	for _, k := range a.keys {
		e := l.getOrAdd(k, now)
		e.inflight++
		a.held = append(a.held, e)
	}
	return a, nil
}

// wait is how long a new try on e must wait: until its back-off ends, or,
// when the tries in flight use up the free failures, until they are judged
// (about a Backoff; the try's caller can only be told to come back).
func (l *Limiter) wait(e *entry, limit int, now time.Time) time.Duration {
	if now.Before(e.locked) {
		return e.locked.Sub(now)
	}
	if e.inflight > 0 && e.failures+e.inflight >= limit {
		return l.cfg.Backoff
	}
	return 0
}

func limitOf(k kind) Limit {
	switch k {
	case kindUser:
		return LimitUser
	case kindSource:
		return LimitSource
	}
	return LimitUserSource
}

// Failed records a wrong password (or unknown user) against every limit the
// try was counted by, and starts or lengthens their back-off.
func (a *Attempt) Failed() {
	a.finish(func(l *Limiter, now time.Time) {
		for i, k := range a.keys {
			e := l.getOrAdd(k, now)
			if !e.lastFail.IsZero() && now.Sub(e.lastFail) >= l.cfg.Memory {
				e.failures = 0
			}
			e.failures++
			e.lastFail = now
			if over := e.failures - a.limits[i]; over >= 0 {
				e.locked = now.Add(l.backoff(over))
			}
			l.settle(e, now)
		}
	})
}

// Succeeded records a right password: the (user, source) and user counts
// start again and the source becomes known for the user. The source's count
// stays: one valid account must not let its holder reset the count of their
// guesses at other users.
func (a *Attempt) Succeeded() {
	a.finish(func(l *Limiter, now time.Time) {
		pair := l.getOrAdd(a.keys[0], now)
		pair.failures, pair.lastFail, pair.locked = 0, time.Time{}, time.Time{}
		pair.known = now.Add(l.cfg.KnownFor)
		l.settle(pair, now)
		if e := l.get(key{kind: kindUser, user: a.keys[0].user}, now); e != nil {
			e.failures, e.lastFail, e.locked = 0, time.Time{}, time.Time{}
			l.settle(e, now)
			l.dropIfIdle(e, now)
		}
	})
}

// Abandon ends a try whose password was never judged (no hashing slot,
// database down): it counts for nothing.
func (a *Attempt) Abandon() {
	a.finish(func(l *Limiter, now time.Time) {
		for _, k := range a.keys {
			if e := l.get(k, now); e != nil {
				l.dropIfIdle(e, now)
			}
		}
	})
}

func (a *Attempt) finish(judge func(*Limiter, time.Time)) {
	l := a.l
	now := l.cfg.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if a.done {
		return
	}
	a.done = true
	// The held entries may have been evicted meanwhile; decrementing an
	// evicted one is harmless, and judge works on the live ones.
	for _, e := range a.held {
		e.inflight = max(0, e.inflight-1)
	}
	judge(l, now)
}

// backoff is Backoff doubled over times, at most MaxBackoff.
func (l *Limiter) backoff(over int) time.Duration {
	d := l.cfg.Backoff
	for range over {
		if d >= l.cfg.MaxBackoff {
			break
		}
		d *= 2
	}
	return min(d, l.cfg.MaxBackoff)
}

// idle reports an entry that holds nothing worth keeping.
func (l *Limiter) idle(e *entry, now time.Time) bool {
	return e.inflight == 0 && !now.Before(e.locked) && !now.Before(e.known) &&
		(e.failures == 0 || now.Sub(e.lastFail) >= l.cfg.Memory)
}

func (l *Limiter) dropIfIdle(e *entry, now time.Time) {
	if el, ok := l.entries[e.key]; ok && el.Value == e && l.idle(e, now) {
		l.remove(el)
	}
}

// holds reports an entry worth more than the tries it has in flight.
func (l *Limiter) holds(e *entry, now time.Time) bool {
	return now.Before(e.locked) || now.Before(e.known) ||
		(e.failures > 0 && now.Sub(e.lastFail) < l.cfg.Memory)
}

func (l *Limiter) listOf(e *entry) *list.List {
	if e.costly {
		return l.costly
	}
	return l.lru
}

// settle moves a tracked entry to the front of the list its state calls
// for. l.mu must be held.
func (l *Limiter) settle(e *entry, now time.Time) {
	el, ok := l.entries[e.key]
	if !ok || el.Value != e {
		return // evicted meanwhile
	}
	l.listOf(e).Remove(el)
	e.costly = l.holds(e, now)
	l.entries[e.key] = l.listOf(e).PushFront(e)
}

// remove forgets a tracked entry. l.mu must be held.
func (l *Limiter) remove(el *list.Element) {
	e := el.Value.(*entry)
	l.listOf(e).Remove(el)
	delete(l.entries, e.key)
}

// get returns k's entry, marked as just used, or nil if there is none (or
// it held nothing worth keeping any more). l.mu must be held.
func (l *Limiter) get(k key, now time.Time) *entry {
	el, ok := l.entries[k]
	if !ok {
		return nil
	}
	e := el.Value.(*entry)
	if l.idle(e, now) {
		l.remove(el)
		return nil
	}
	l.listOf(e).MoveToFront(el)
	return e
}

// getOrAdd returns k's entry, adding it, and dropping the least recently
// used one if the limiter is full. l.mu must be held.
func (l *Limiter) getOrAdd(k key, now time.Time) *entry {
	if e := l.get(k, now); e != nil {
		return e
	}
	// Forgotten entries at the back go as new ones come, so a quiet limiter
	// shrinks again without a sweeper goroutine.
	for _, ls := range []*list.List{l.lru, l.costly} {
		if oldest := ls.Back(); oldest != nil && l.idle(oldest.Value.(*entry), now) {
			l.remove(oldest)
		}
	}
	if len(l.entries) >= l.cfg.MaxEntries {
		oldest := l.lru.Back()
		if oldest == nil {
			oldest = l.costly.Back()
		}
		l.remove(oldest)
	}
	e := &entry{key: k}
	l.entries[k] = l.lru.PushFront(e)
	return e
}

// Len is the number of keys tracked.
func (l *Limiter) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.entries)
}
