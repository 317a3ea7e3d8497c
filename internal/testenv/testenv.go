// Package testenv gives each test its own Postgres database and its own
// JetStream stream and consumers on the machine's real services, and removes
// them when the test ends, so tests can run twice in a row and in parallel.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"

	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/schema"
)

// AdminDatabaseURL is the server tests create their databases on. Override
// with TOKENPIPE_TEST_DATABASE_URL.
func AdminDatabaseURL() string {
	if u := os.Getenv("TOKENPIPE_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
}

// NATSURL is the JetStream server tests use. Override with
// TOKENPIPE_TEST_NATS_URL.
func NATSURL() string {
	if u := os.Getenv("TOKENPIPE_TEST_NATS_URL"); u != "" {
		return u
	}
	return "nats://127.0.0.1:4222"
}

// Name returns a short random lowercase name with the given prefix.
func Name(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// Database creates a fresh database, migrates it, and returns its URL and a
// pool. Both are dropped when the test ends.
func Database(t testing.TB) (string, *pgxpool.Pool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, AdminDatabaseURL())
	if err != nil {
		t.Fatalf("testenv: connect to Postgres at %s: %v", AdminDatabaseURL(), err)
	}
	defer admin.Close(context.Background())
	name := Name("tp_test_")
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("testenv: create database: %v", err)
	}
	url := schema.WithDatabase(AdminDatabaseURL(), name)
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatalf("testenv: open pool: %v", err)
	}
	t.Cleanup(func() {
		pool.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, AdminDatabaseURL())
		if err != nil {
			t.Errorf("testenv: drop database %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("testenv: drop database %s: %v", name, err)
		}
	})
	if _, err := schema.Up(ctx, pool); err != nil {
		t.Fatalf("testenv: migrate: %v", err)
	}
	return url, pool
}

// Topology returns a topology with names unique to this test.
func Topology() events.Topology {
	id := Name("")
	return events.Topology{
		Stream:     "TPTEST_" + strings.ToUpper(id),
		Prefix:     "tptest." + id,
		MaxAge:     time.Hour,
		MaxBytes:   -1,
		Replicas:   1,
		Duplicates: 2 * time.Minute,
		Persister:  "persister",
		Recovery:   "recovery",
		AckWait:    30 * time.Second,
		MaxPending: 20000,
	}
}

// JetStream connects to the test NATS server, provisions a stream unique to
// the test, and deletes it when the test ends.
func JetStream(t testing.TB) (*nats.Conn, jetstream.JetStream, events.Topology) {
	t.Helper()
	return JetStreamAt(t, NATSURL())
}

// JetStreamAt is JetStream against a given server URL.
func JetStreamAt(t testing.TB, url string) (*nats.Conn, jetstream.JetStream, events.Topology) {
	t.Helper()
	nc, err := nats.Connect(url, nats.Name("tokenpipe-test"))
	if err != nil {
		t.Fatalf("testenv: connect to NATS at %s: %v", url, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("testenv: jetstream: %v", err)
	}
	topo := Topology()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := events.Provision(ctx, js, topo); err != nil {
		t.Fatalf("testenv: provision: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := js.DeleteStream(ctx, topo.Stream); err != nil && !nc.IsClosed() {
			t.Errorf("testenv: delete stream %s: %v", topo.Stream, err)
		}
		nc.Close()
	})
	return nc, js, topo
}

// Eventually polls cond until it returns true or the timeout passes.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		ok, err := cond()
		if err == nil && ok {
			return
		}
		lastErr = err
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s (last error: %v)", timeout, what, lastErr)
}

// Must fails the test on err.
func Must(t testing.TB, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// Logger returns a logger that writes through t.Log, so output shows only for
// failing or verbose tests.
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
