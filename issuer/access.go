package issuer

import "github.com/tokenpipe/tokenpipe/internal/clients"

// mayIntrospect reports whether client may learn about the token text: a
// resource server (the client's introspect permission) about any token,
// every other client about its own only (RFC 7662 section 4 leaves the
// policy to the server). A refusal is answered like an unknown token,
// active=false, and is decided from the token alone, before any lookup, so
// neither the answer nor its timing tells whether the token exists.
func (s *Server) mayIntrospect(client *clients.Client, text string) bool {
	if client.Introspect {
		return true
	}
	c, err := s.cfg.Keys.Decode(text)
	return err == nil && c.ClientID == client.ID
}
