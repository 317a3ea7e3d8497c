package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// profileRoles collects CPU profiles of every role (from its ops address's
// /debug/pprof, which the roles serve when TOKENPIPE_PPROF is true) and of
// this process while f runs, into dir as <role>.pprof and loadgen.pprof. The
// profiles cover seconds of f's interval, so they explain the same interval
// the CPU table measures.
func profileRoles(ctx context.Context, d *deployment, dir string, seconds int, f func() error) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("profile directory: %w", err)
	}
	stop, err := startCPUProfile(filepath.Join(dir, "loadgen.pprof"))
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	errs := make([]error, 0, len(d.roles))
	var mu sync.Mutex
	for role, c := range d.roles {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fetchProfile(ctx, c.ops, seconds, filepath.Join(dir, role+".pprof")); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("%s: %w", role, err))
				mu.Unlock()
			}
		}()
	}
	ferr := f()
	wg.Wait()
	stop()
	if ferr != nil {
		return ferr
	}
	return errors.Join(errs...)
}

func fetchProfile(ctx context.Context, ops string, seconds int, path string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(seconds+30)*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", ops, seconds), nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("fetch profile: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("fetch profile: %s (is %s_PPROF=true set for the roles?)", resp.Status, "TOKENPIPE")
	}
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, resp.Body); err != nil {
		out.Close()
		return fmt.Errorf("write profile: %w", err)
	}
	return out.Close()
}
