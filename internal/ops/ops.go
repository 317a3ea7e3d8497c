// Package ops serves what operators and orchestrators poll: Prometheus
// metrics, liveness and readiness.
package ops

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check reports whether one dependency is usable right now.
type Check struct {
	Name string
	Func func(ctx context.Context) error
}

// Server answers /metrics, /healthz and /readyz. Readiness is the AND of the
// checks and of the draining flag, so a pod that received SIGTERM leaves its
// Service's endpoints before it stops serving.
type Server struct {
	Registry *prometheus.Registry
	checks   []Check
	draining atomic.Bool
	log      *slog.Logger
	// Profiling serves net/http/pprof under /debug/pprof/. Off by default:
	// profiles reveal internals and cost CPU while taken.
	Profiling bool
}

// NewServer returns a server with a fresh registry holding the Go and
// process collectors.
func NewServer(log *slog.Logger, checks ...Check) *Server {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &Server{Registry: reg, checks: checks, log: log}
}

// AddCheck adds a readiness check.
func (s *Server) AddCheck(c Check) { s.checks = append(s.checks, c) }

// SetDraining makes /readyz fail from now on.
func (s *Server) SetDraining() { s.draining.Store(true) }

// Handler routes the three endpoints.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.Registry, promhttp.HandlerOpts{Registry: s.Registry}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", s.ready)
	if s.Profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	result := map[string]string{}
	status := http.StatusOK
	if s.draining.Load() {
		result["drain"] = "shutting down"
		status = http.StatusServiceUnavailable
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	for _, c := range s.checks {
		if err := c.Func(ctx); err != nil {
			result[c.Name] = err.Error()
			status = http.StatusServiceUnavailable
			continue
		}
		result[c.Name] = "ok"
	}
	writeJSON(w, status, result)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// Serve listens on addr until ctx is done, then shuts down. An empty addr
// disables the server.
func (s *Server) Serve(ctx context.Context, addr string) error {
	if addr == "" {
		<-ctx.Done()
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("ops server: listen on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	s.log.Info("ops server listening", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("ops server: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("ops server shutdown: %w", err)
	}
	return nil
}
