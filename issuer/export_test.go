package issuer

import "time"

// SetClock replaces the clock that cuts coalescing windows, so tests can
// replay a window edge deterministically.
func SetClock(s *Server, now func() time.Time) { s.now = now }
