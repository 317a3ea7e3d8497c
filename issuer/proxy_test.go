package issuer

import "testing"

func TestTrustedProxies(t *testing.T) {
	p, err := ParseTrustedProxies([]string{"10.0.0.0/8", " 192.168.1.7 ", "", "fd00::/8", "::ffff:172.16.0.0/108"})
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]bool{
		"10.1.2.3:5555":        true,
		"10.1.2.3":             true,
		"192.168.1.7:1":        true,
		"192.168.1.8:1":        false,
		"[fd00::1]:443":        true,
		"[fe80::1%eth0]:443":   false,
		"[::ffff:10.9.9.9]:80": true,
		"172.16.5.5:1":         true,
		"172.32.0.1:1":         false,
		"11.0.0.1:80":          false,
		"not an address":       false,
		"":                     false,
		"@unix":                false,
	} {
		if got := p.Trusted(addr); got != want {
			t.Errorf("Trusted(%q) = %v, want %v", addr, got, want)
		}
	}
	var none TrustedProxies
	if none.Trusted("127.0.0.1:1") {
		t.Error("the zero value trusts an address")
	}
	for _, bad := range []string{"10.0.0.0/33", "nope", "10.0.0/8"} {
		if _, err := ParseTrustedProxies([]string{bad}); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

func TestValidateIssuerURL(t *testing.T) {
	for _, ok := range []string{"https://auth.example.com", "https://auth.example.com/tenant", "http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"} {
		if err := ValidateIssuerURL(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "auth.example.com", "http://auth.example.com", "https://auth.example.com/?a=b", "https://auth.example.com?",
		"https://auth.example.com/#x", "https://u:p@auth.example.com", "ftp://auth.example.com", "https:///path", "http://127.0.0.1.example.com"} {
		if err := ValidateIssuerURL(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
