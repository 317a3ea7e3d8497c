package throttle

import (
	"context"
	"errors"
	"runtime"
	"time"
)

// ErrBusy: every slot stayed taken for the whole wait.
var ErrBusy = errors.New("every password hashing slot is busy")

// Pool bounds how many password hashes are checked at once, and how long a
// request waits for its turn. bcrypt is made to be slow: unbounded, a few
// dozen requests a second for made-up users fill every core, and everything
// else the process serves starves. Bounded, they queue for at most the wait
// and are then refused, while the other cores stay free.
type Pool struct {
	slots chan struct{}
	wait  time.Duration
}

// DefaultPoolSize is half the CPUs the Go runtime uses (GOMAXPROCS, which
// follows a container's CPU limit), rounded up.
func DefaultPoolSize() int { return (runtime.GOMAXPROCS(0) + 1) / 2 }

// NewPool returns a pool of size slots (DefaultPoolSize if size <= 0) whose
// Acquire waits at most wait.
func NewPool(size int, wait time.Duration) *Pool {
	if size <= 0 {
		size = DefaultPoolSize()
	}
	return &Pool{slots: make(chan struct{}, size), wait: max(0, wait)}
}

// Size is the number of slots.
func (p *Pool) Size() int { return cap(p.slots) }

// Acquire takes a slot, waiting at most the pool's wait: ErrBusy after it,
// ctx's error if ctx ends first. On success, call release once when done.
func (p *Pool) Acquire(ctx context.Context) (release func(), err error) {
	release = func() { <-p.slots }
	select {
	case p.slots <- struct{}{}:
		return release, nil
	default:
	}
	if p.wait == 0 {
		return nil, ErrBusy
	}
	t := time.NewTimer(p.wait)
	defer t.Stop()
	select {
	case p.slots <- struct{}{}:
		return release, nil
	case <-t.C:
		return nil, ErrBusy
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Do runs f in a slot (see Acquire) on a thread of lower priority, where
// the operating system has one for a thread, so that password hashing gets
// the CPU only after everything else on the machine. It returns ErrBusy or
// ctx's error if no slot was had, and f was not run.
func (p *Pool) Do(ctx context.Context, f func()) error {
	release, err := p.Acquire(ctx)
	if err != nil {
		return err
	}
	defer release()
	runNiced(f)
	return nil
}
