package app

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// writeCA creates a CA and a server certificate for 127.0.0.1 and returns the
// CA file and the server's tls.Config.
func writeCA(t *testing.T) (string, *tls.Config) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tokenpipe test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return caFile, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}}, MinVersion: tls.VersionTLS12}
}

func startServer(t *testing.T, opts *server.Options) string {
	t.Helper()
	opts.Host, opts.Port, opts.NoLog, opts.NoSigs = "127.0.0.1", -1, true, true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("embedded NATS not ready")
	}
	return s.ClientURL()
}

// TestNATSTLSIsWired: TOKENPIPE_NATS_TLS_CA makes a TLS-only server trusted;
// without it the connection is refused.
func TestNATSTLSIsWired(t *testing.T) {
	caFile, tlsCfg := writeCA(t)
	url := startServer(t, &server.Options{TLSConfig: tlsCfg, TLS: true})
	c := &Common{NATSURL: url}
	if nc, _, err := ConnectNATS(c, "t", discard(), nil); err == nil {
		nc.Close()
		t.Fatal("connected to a TLS server whose CA was not configured")
	}
	c.NATSTLSCA = caFile
	nc, _, err := ConnectNATS(c, "t", discard(), nil)
	if err != nil {
		t.Fatalf("with TOKENPIPE_NATS_TLS_CA: %v", err)
	}
	defer nc.Close()
	if st, err := nc.TLSConnectionState(); err != nil || !st.HandshakeComplete {
		t.Fatalf("not connected over TLS: %v", err)
	}
}

// TestNATSNKeyIsWired: TOKENPIPE_NATS_NKEY_FILE authenticates to a server
// that requires that nkey; without it the server refuses.
func TestNATSNKeyIsWired(t *testing.T) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	seedFile := filepath.Join(t.TempDir(), "user.nk")
	if err := os.WriteFile(seedFile, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	url := startServer(t, &server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}})
	c := &Common{NATSURL: url}
	if nc, _, err := ConnectNATS(c, "t", discard(), nil); err == nil {
		nc.Close()
		t.Fatal("connected without the required nkey")
	}
	c.NATSNKey = seedFile
	nc, _, err := ConnectNATS(c, "t", discard(), nil)
	if err != nil {
		t.Fatalf("with TOKENPIPE_NATS_NKEY_FILE: %v", err)
	}
	nc.Close()
}
