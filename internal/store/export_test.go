package store

import "testing"

// AfterProbe runs f (once) inside the next WriteBatch, between its probe and
// its COPY, where a concurrent writer can win a race.
func AfterProbe(t testing.TB, f func()) {
	afterProbe = f
	t.Cleanup(func() { afterProbe = nil })
}
