//go:build dev

package main

import (
	"bytes"
	"context"
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestDemoShowsARaceThroughRecovery: coalescing absorbs every race of the
// demo's traffic, so the demo makes one itself, and its summary and rows say
// that recovery made the older token INACTIVE.
func TestDemoShowsARaceThroughRecovery(t *testing.T) {
	dbURL, _ := testenv.Database(t)
	t.Setenv("TOKENPIPE_NATS_URL", "") // registers the variable's restore
	os.Unsetenv("TOKENPIPE_NATS_URL")  // unset: the demo's embedded NATS, removed after
	t.Setenv("TOKENPIPE_DATABASE_URL", dbURL)
	t.Setenv("TOKENPIPE_HTTP_ADDR", "127.0.0.1:0")
	t.Setenv("TOKENPIPE_STREAM", testenv.Name("DEMO"))
	t.Setenv("TOKENPIPE_SUBJECT_PREFIX", testenv.Name("demo"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	if code := run(ctx, []string{"demo", "-requests", "200", "-races", "20"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`race losers made INACTIVE +[1-9]`),
		regexp.MustCompile(`token A +[0-9a-f]{12} +stream seq \d+ +INACTIVE +\(made INACTIVE`),
		regexp.MustCompile(`token B +[0-9a-f]{12} +stream seq \d+ +ACTIVE\n`),
	} {
		if !want.MatchString(stdout.String()) {
			t.Errorf("demo output lacks %s:\n%s", want, stdout.String())
		}
	}
}
