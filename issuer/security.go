package issuer

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// metadataPath is the RFC 8414 document: it carries no credential, so it is
// served over plain HTTP even when RequireTLS is set.
const metadataPath = "/.well-known/oauth-authorization-server"

// hsts is sent on answers that went over TLS. One year; no includeSubDomains,
// as the service cannot know what else runs under its parent domain.
const hsts = "max-age=31536000"

// fixedHeaders are header values every answer shares, assigned to the header
// map under their canonical names: Header.Set allocates a slice per value,
// and the token endpoint sets nine on every answer. net/http only reads the
// slices; each has len == cap, so an Add elsewhere copies rather than
// appends into them. Never modify an element.
var fixedHeaders = struct {
	nosniff, noReferrer, deny, csp, hsts, json, noStore, noCache []string
}{
	nosniff:    []string{"nosniff"},
	noReferrer: []string{"no-referrer"},
	deny:       []string{"DENY"},
	csp:        []string{"default-src 'none'; frame-ancestors 'none'"},
	hsts:       []string{hsts},
	json:       []string{"application/json;charset=UTF-8"},
	noStore:    []string{"no-store"},
	noCache:    []string{"no-cache"},
}

// secure reports whether r came over TLS: straight to this server, or to a
// trusted proxy that says so in X-Forwarded-Proto. The header from anyone
// else is ignored, as a client can set it to anything.
func (s *Server) secure(r *http.Request) bool {
	if r.TLS != nil {
		return true
	}
	return s.cfg.TrustedProxies.FromProxy(r) &&
		strings.EqualFold(strings.TrimSpace(r.Header.Get("X-Forwarded-Proto")), "https")
}

// guard sets the headers that keep a browser from sniffing, framing or
// leaking any answer, and, with RequireTLS, refuses every request that
// could carry a credential (all but the metadata document) unless it came
// over TLS.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h["X-Content-Type-Options"] = fixedHeaders.nosniff
		h["Referrer-Policy"] = fixedHeaders.noReferrer
		h["X-Frame-Options"] = fixedHeaders.deny
		h["Content-Security-Policy"] = fixedHeaders.csp
		secure := s.secure(r)
		if secure {
			h["Strict-Transport-Security"] = fixedHeaders.hsts
		}
		if s.cfg.RequireTLS && !secure && r.URL.Path != metadataPath {
			s.writeError(w, badRequest("invalid_request", "this endpoint requires TLS"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// ValidateIssuerURL checks an RFC 8414 issuer identifier: an https URL with
// a host and no query, fragment or user information. Plain http is allowed
// for loopback hosts only, so a local demo works without a certificate.
func ValidateIssuerURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return errors.New("not a URL")
	}
	switch {
	case u.Host == "" || u.Opaque != "":
		return errors.New("must be an absolute URL with a host, like https://auth.example.com")
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(raw, "#"):
		return errors.New("must have no query or fragment (RFC 8414 section 2)")
	case u.User != nil:
		return errors.New("must not hold user information")
	case u.Scheme == "https":
		return nil
	case u.Scheme == "http" && isLoopback(u.Hostname()):
		return nil
	}
	return fmt.Errorf("must use https (http only for a loopback host), not %q", u.Scheme)
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
