package issuer

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// certCheckEvery bounds how often a handshake looks at the certificate
// files: a renewed certificate is served within this long of being written.
const certCheckEvery = time.Second

// certReloader serves a certificate and key from files and swaps in a new
// pair when either file changes (size or modification time), so a renewed
// certificate needs no restart. The check runs inside a handshake, at most
// once per certCheckEvery, so there is no goroutine to own. A pair that does
// not load (half written, key and certificate not matching) is logged once
// and the last good one stays in service; the next change is tried again.
type certReloader struct {
	certFile, keyFile string
	log               *slog.Logger
	every             time.Duration

	cert atomic.Pointer[tls.Certificate]

	mu      sync.Mutex // held by the one handshake that checks the files
	checked time.Time
	seen    fileStamp // of the files last tried, loaded or not
}

type fileStamp struct {
	certMod, keyMod   time.Time
	certSize, keySize int64
}

// newCertReloader loads the pair once; an error here stops the start.
func newCertReloader(certFile, keyFile string, log *slog.Logger, every time.Duration) (*certReloader, error) {
	c := &certReloader{certFile: certFile, keyFile: keyFile, log: log, every: every}
	st, err := c.stamp()
	if err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate %s and key %s: %w", certFile, keyFile, err)
	}
	c.cert.Store(&cert)
	c.seen, c.checked = st, time.Now()
	return c, nil
}

func (c *certReloader) stamp() (fileStamp, error) {
	ci, err := os.Stat(c.certFile)
	if err != nil {
		return fileStamp{}, fmt.Errorf("TLS certificate: %w", err)
	}
	ki, err := os.Stat(c.keyFile)
	if err != nil {
		return fileStamp{}, fmt.Errorf("TLS key: %w", err)
	}
	return fileStamp{certMod: ci.ModTime(), keyMod: ki.ModTime(), certSize: ci.Size(), keySize: ki.Size()}, nil
}

// GetCertificate is for tls.Config.
func (c *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.maybeReload(time.Now())
	return c.cert.Load(), nil
}

func (c *certReloader) maybeReload(now time.Time) {
	if !c.mu.TryLock() {
		return // another handshake is checking; this one takes the current pair
	}
	defer c.mu.Unlock()
	if now.Sub(c.checked) < c.every {
		return
	}
	c.checked = now
	st, err := c.stamp()
	if st == c.seen {
		return
	}
	c.seen = st
	if err != nil {
		c.log.Error("TLS certificate files unreadable; serving the previous certificate", "err", err)
		return
	}
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		c.log.Error("TLS certificate reload failed; serving the previous certificate",
			"cert_file", c.certFile, "key_file", c.keyFile, "err", err)
		return
	}
	c.cert.Store(&cert)
	c.log.Info("TLS certificate reloaded", "cert_file", c.certFile)
}
