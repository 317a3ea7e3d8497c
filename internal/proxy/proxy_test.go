package proxy

import (
	"net/http"
	"testing"
)

func TestClientIP(t *testing.T) {
	trusted, err := Parse("10.0.0.0/8, 192.168.1.10, ::ffff:172.16.0.0/108, fd00::/8")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		trusted Trusted
		remote  string
		xff     []string
		want    string
	}{
		{"no proxy configured ignores the header", Trusted{}, "10.1.2.3:5000", []string{"203.0.113.9"}, "10.1.2.3"},
		{"untrusted peer's header is ignored", trusted, "198.51.100.7:5000", []string{"203.0.113.9"}, "198.51.100.7"},
		{"trusted peer without header", trusted, "10.1.2.3:5000", nil, "10.1.2.3"},
		{"one trusted proxy", trusted, "10.1.2.3:5000", []string{"203.0.113.9"}, "203.0.113.9"},
		{"client-written entries left of the client are ignored", trusted, "10.1.2.3:5000", []string{"1.1.1.1, 203.0.113.9"}, "203.0.113.9"},
		{"a chain of trusted proxies", trusted, "10.1.2.3:5000", []string{"203.0.113.9, 192.168.1.10", "10.9.9.9"}, "203.0.113.9"},
		{"all trusted: the leftmost", trusted, "10.1.2.3:5000", []string{"10.0.0.1, 10.0.0.2"}, "10.0.0.1"},
		{"garbage stops at the last good hop", trusted, "10.1.2.3:5000", []string{"junk, 10.0.0.2"}, "10.0.0.2"},
		{"entries with ports", trusted, "10.1.2.3:5000", []string{"[2001:db8::1]:4711"}, "2001:db8::1"},
		{"IPv6 trusted peer", trusted, "[fd00::1]:5000", []string{"2001:db8::7"}, "2001:db8::7"},
		{"mapped IPv4 peer", trusted, "[::ffff:172.16.0.1]:5000", []string{"203.0.113.9"}, "203.0.113.9"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, _ := http.NewRequest(http.MethodGet, "/", nil)
			r.RemoteAddr = c.remote
			for _, h := range c.xff {
				r.Header.Add("X-Forwarded-For", h)
			}
			if got := c.trusted.ClientIP(r).String(); got != c.want {
				t.Fatalf("ClientIP = %s, want %s", got, c.want)
			}
		})
	}
}

func TestParseRefusesGarbage(t *testing.T) {
	for _, bad := range []string{"10.0.0.0/33", "example.com", "10.0.0.0/8,nope"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if tr, err := Parse(" "); err != nil || len(tr.prefixes) != 0 {
		t.Fatalf("blank: %v %v", tr, err)
	}
}

func TestFromProxy(t *testing.T) {
	trusted, _ := Parse("127.0.0.1")
	r, _ := http.NewRequest(http.MethodGet, "/", nil)
	r.RemoteAddr = "127.0.0.1:1"
	if !trusted.FromProxy(r) || (Trusted{}).FromProxy(r) {
		t.Fatal("FromProxy disagrees with the configuration")
	}
	r.RemoteAddr = "pipe"
	if trusted.FromProxy(r) {
		t.Fatal("an unaddressed peer counted as a proxy")
	}
}
