package recovery

import "testing"

// AfterLock runs f inside every resolution round of Apply, between locking
// the keys and writing, where another writer can activate a key.
func AfterLock(t testing.TB, f func()) {
	afterLock = f
	t.Cleanup(func() { afterLock = nil })
}
