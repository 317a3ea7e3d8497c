package throttle

import (
	"runtime"
	"syscall"
)

// hashNice is how much nicer than the process the threads that hash
// passwords are: the scheduler then gives them only what the token
// endpoint, NATS and Postgres on the same machine leave.
const hashNice = 10

// runNiced runs f on a fresh OS thread with a lower priority. An
// unprivileged process cannot raise a thread's priority again, so the thread
// is never handed back: the goroutine ends still locked to it, and Go ends
// the thread with it. A thread costs tens of microseconds; a bcrypt check,
// tens of milliseconds.
func runNiced(f func()) {
	done := make(chan any)
	go func() {
		var panicked any
		defer func() { done <- panicked }()
		defer func() { panicked = recover() }()
		runtime.LockOSThread()
		// Failing to lower the priority only loses the nicety. The raw
		// getpriority answers 20 - nice.
		tid := syscall.Gettid()
		if prio, err := syscall.Getpriority(syscall.PRIO_PROCESS, tid); err == nil {
			_ = syscall.Setpriority(syscall.PRIO_PROCESS, tid, min(19, 20-prio+hashNice))
		}
		f()
	}()
	if p := <-done; p != nil {
		panic(p)
	}
}
