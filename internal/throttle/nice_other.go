//go:build !linux

package throttle

// runNiced runs f as it is: lowering one thread's priority is Linux's.
func runNiced(f func()) { f() }
