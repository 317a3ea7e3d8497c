package store

import (
	"time"

	"github.com/tokenpipe/tokenpipe/events"
)

// Reasons recorded with a revocation.
const (
	ReasonClient = "client_request" // RFC 7009 revocation by the client
	ReasonReuse  = "refresh_reuse"  // a rotated refresh token was presented again
	ReasonUser   = "user_request"   // the user removed the application
	ReasonAdmin  = "admin_request"
)

// Notice builds the TokenRevoked notice for a revocation, for the issuers'
// introspection caches.
func Notice(res Revocation, reason string) *events.TokenRevoked {
	return &events.TokenRevoked{Digests: res.Digests, Reason: reason, RevokedAt: time.Now().UTC()}
}
