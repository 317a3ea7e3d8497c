package store

import "testing"

// AfterProbe runs f (once) inside the next WriteBatch, between its probe and
// its COPY, where a concurrent writer can win a race.
func AfterProbe(t testing.TB, f func()) {
	afterProbe = f
	t.Cleanup(func() { afterProbe = nil })
}

// AfterFirstWrite runs f inside every WriteBatch after its first statement
// that wrote rows, while the rows it wrote are not committed.
func AfterFirstWrite(t testing.TB, f func()) {
	afterFirstWrite = f
	t.Cleanup(func() { afterFirstWrite = nil })
}
