// Package demo runs the whole pipeline in one process, exercises it with real
// HTTP requests, and reports what it saw. It is the first thing a newcomer
// runs, so it also starts an embedded NATS server when none is configured.
package demo

import (
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// EmbeddedNATS is a JetStream server inside this process, storing in a
// temporary directory that Shutdown removes.
type EmbeddedNATS struct {
	srv *server.Server
	dir string
}

// StartNATS starts an embedded JetStream server on a free loopback port.
func StartNATS() (*EmbeddedNATS, error) {
	dir, err := os.MkdirTemp("", "tokenpipe-demo-nats-")
	if err != nil {
		return nil, fmt.Errorf("embedded NATS: %w", err)
	}
	srv, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: dir, NoSigs: true, NoLog: true,
	})
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("embedded NATS: %w", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("embedded NATS did not become ready")
	}
	return &EmbeddedNATS{srv: srv, dir: dir}, nil
}

// URL is the client URL of the server.
func (e *EmbeddedNATS) URL() string { return e.srv.ClientURL() }

// Shutdown stops the server and removes its store.
func (e *EmbeddedNATS) Shutdown() {
	e.srv.Shutdown()
	e.srv.WaitForShutdown()
	os.RemoveAll(e.dir)
}
