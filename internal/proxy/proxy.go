// Package proxy decides how much of the forwarding headers a reverse proxy
// adds can be believed. Anyone can send X-Forwarded-For or
// X-Forwarded-Proto; they mean something only when the TCP peer is a proxy
// the operator declared trusted, which overwrites or appends to them.
package proxy

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
)

// Trusted is the set of reverse proxies whose forwarding headers are
// believed. The zero value trusts none: every request's TCP peer is its
// client.
type Trusted struct {
	prefixes []netip.Prefix
}

// Parse reads a comma-separated list of CIDRs or single addresses
// ("10.0.0.0/8, 192.168.1.10, fd00::/8"); an empty string trusts none.
func Parse(list string) (Trusted, error) {
	var t Trusted
	for _, f := range strings.Split(list, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.Contains(f, "/") {
			a, err := netip.ParseAddr(f)
			if err != nil {
				return Trusted{}, fmt.Errorf("%q is neither a CIDR nor an IP address", f)
			}
			a = a.Unmap()
			t.prefixes = append(t.prefixes, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return Trusted{}, fmt.Errorf("%q is not a CIDR: %v", f, err)
		}
		if p.Addr().Is4In6() {
			p = netip.PrefixFrom(p.Addr().Unmap(), max(0, p.Bits()-96))
		}
		t.prefixes = append(t.prefixes, p.Masked())
	}
	return t, nil
}

// Contains reports whether a is a trusted proxy.
func (t Trusted) Contains(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range t.prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Peer is the request's TCP peer, or the zero Addr if RemoteAddr is not an
// address (a test's in-memory connection).
func Peer(r *http.Request) netip.Addr {
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		return ap.Addr().Unmap()
	}
	if a, err := netip.ParseAddr(r.RemoteAddr); err == nil {
		return a.Unmap()
	}
	return netip.Addr{}
}

// FromProxy reports whether the request came straight from a trusted proxy,
// so that the forwarding headers it carries were set by that proxy (for
// X-Forwarded-Proto: provided the proxy overwrites it).
func (t Trusted) FromProxy(r *http.Request) bool {
	p := Peer(r)
	return p.IsValid() && t.Contains(p)
}

// ClientIP is the address the request came from. Without a trusted proxy in
// front it is the TCP peer. From a trusted proxy, X-Forwarded-For is read
// from the right (each proxy appends the address it got the request from)
// past every trusted proxy; the first address that is not one is the
// client. What lies further left was written by the client itself and is
// never believed. An entry that is not an address stops the walk at the
// last one that was.
func (t Trusted) ClientIP(r *http.Request) netip.Addr {
	client := Peer(r)
	if !client.IsValid() || !t.Contains(client) {
		return client
	}
	var hops []string
	for _, h := range r.Header.Values("X-Forwarded-For") {
		hops = append(hops, strings.Split(h, ",")...)
	}
	for i := len(hops) - 1; i >= 0; i-- {
		a, ok := parseHop(strings.TrimSpace(hops[i]))
		if !ok {
			return client
		}
		client = a
		if !t.Contains(a) {
			return a
		}
	}
	return client
}

// parseHop reads one X-Forwarded-For entry: an address, possibly with a
// port ("192.0.2.1:4711", "[2001:db8::1]:4711").
func parseHop(s string) (netip.Addr, bool) {
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap(), true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap(), true
	}
	return netip.Addr{}, false
}

// String lists the trusted ranges, for logs.
func (t Trusted) String() string {
	s := make([]string, len(t.prefixes))
	for i, p := range t.prefixes {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
