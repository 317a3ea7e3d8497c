package throttle

import (
	"syscall"
	"testing"
)

// niceness is the calling thread's nice value. The raw system call answers
// 20 - nice, so that it is never negative.
func niceness(t *testing.T) int {
	t.Helper()
	prio, err := syscall.Getpriority(syscall.PRIO_PROCESS, syscall.Gettid())
	if err != nil {
		t.Fatal(err)
	}
	return 20 - prio
}

func TestPasswordChecksRunNiced(t *testing.T) {
	var inside int
	runNiced(func() { inside = niceness(t) })
	outside := niceness(t)
	if inside != min(19, outside+hashNice) {
		t.Fatalf("nice inside = %d, outside = %d: want %d more inside", inside, outside, hashNice)
	}
}
