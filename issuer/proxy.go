package issuer

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// TrustedProxies is the set of addresses whose forwarding headers
// (X-Forwarded-Proto here) are believed: the TLS-terminating proxies in
// front of the service. The zero value trusts nobody, so a header a client
// set itself is never taken as fact.
type TrustedProxies struct {
	prefixes []netip.Prefix
}

// ParseTrustedProxies reads CIDRs ("10.0.0.0/8", "fd00::/8") or single
// addresses ("10.1.2.3"). Empty entries are skipped.
func ParseTrustedProxies(list []string) (TrustedProxies, error) {
	var p TrustedProxies
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !strings.Contains(s, "/") {
			a, err := netip.ParseAddr(s)
			if err != nil {
				return TrustedProxies{}, fmt.Errorf("%q is neither a CIDR nor an IP address", s)
			}
			p.prefixes = append(p.prefixes, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		pr, err := netip.ParsePrefix(s)
		if err != nil {
			return TrustedProxies{}, fmt.Errorf("%q is neither a CIDR nor an IP address", s)
		}
		if pr.Addr().Is4In6() {
			// ::ffff:10.0.0.0/104 is 10.0.0.0/8: compare in IPv4 terms.
			pr = netip.PrefixFrom(pr.Addr().Unmap(), pr.Bits()-96)
		}
		p.prefixes = append(p.prefixes, pr.Masked())
	}
	return p, nil
}

// Trusted reports whether remoteAddr (an http.Request's RemoteAddr,
// "host:port", or a bare address) belongs to a trusted proxy.
func (p TrustedProxies) Trusted(remoteAddr string) bool {
	if len(p.prefixes) == 0 {
		return false
	}
	host := remoteAddr
	if h, _, err := net.SplitHostPort(remoteAddr); err == nil {
		host = h
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	a = a.Unmap().WithZone("")
	for _, pr := range p.prefixes {
		if pr.Contains(a) {
			return true
		}
	}
	return false
}

// String lists the trusted ranges, for logs.
func (p TrustedProxies) String() string {
	s := make([]string, len(p.prefixes))
	for i, pr := range p.prefixes {
		s[i] = pr.String()
	}
	return strings.Join(s, ",")
}
