package app

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestClientGrantCommand: `tokenpipe client grant ID GRANT on|off` changes
// one grant; bad arguments are a usage error and change nothing.
func TestClientGrantCommand(t *testing.T) {
	url, pool := testenv.Database(t)
	ctx := context.Background()
	_, err := clients.Add(ctx, pool, "mobile", nil, []string{"password", "refresh_token"})
	testenv.Must(t, err, "add client")
	t.Setenv(EnvPrefix+"_DATABASE_URL", url)
	run := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := RunClient(ctx, append([]string{"grant"}, args...), &out, &errOut)
		return out.String(), err
	}
	grants := func() string {
		list, err := clients.List(ctx, pool)
		testenv.Must(t, err, "list")
		return strings.Join(list[0].Grants, ",")
	}
	out, err := run("mobile", "refresh_token", "off")
	testenv.Must(t, err, "grant off")
	if out != "client mobile: refresh_token off\n" || grants() != "password" {
		t.Fatalf("after off: printed %q, grants %s", out, grants())
	}
	for _, bad := range [][]string{{"mobile", "implicit", "on"}, {"mobile", "refresh_token", "maybe"}, {"mobile", "refresh_token"}} {
		if _, err := run(bad...); !errors.Is(err, ErrUsage) {
			t.Errorf("client grant %v: err = %v, want a usage error", bad, err)
		}
	}
	if _, err := run("nobody", "password", "on"); !errors.Is(err, clients.ErrNotFound) {
		t.Fatalf("unknown client: err = %v", err)
	}
	if _, err := run("mobile", "refresh_token", "on"); err != nil || grants() != "password,refresh_token" {
		t.Fatalf("after on: err %v, grants %s", err, grants())
	}
}

// TestClientRotationWindowCommand: `client add -rotation-window` and
// `client rotation-window ID D|default` set a client's own window; bad
// values are a usage error naming the problem and change nothing.
func TestClientRotationWindowCommand(t *testing.T) {
	url, pool := testenv.Database(t)
	ctx := context.Background()
	t.Setenv(EnvPrefix+"_DATABASE_URL", url)
	run := func(args ...string) (string, string, error) {
		var out, errOut bytes.Buffer
		err := RunClient(ctx, args, &out, &errOut)
		return out.String(), errOut.String(), err
	}
	window := func() string {
		list, err := clients.List(ctx, pool)
		testenv.Must(t, err, "list")
		if len(list) != 1 {
			t.Fatalf("%d clients", len(list))
		}
		if list[0].RotationWindow == nil {
			return "default"
		}
		return list[0].RotationWindow.String()
	}
	if _, _, err := run("add", "spa", "-grants", "password", "-rotation-window", "2s"); err != nil || window() != "2s" {
		t.Fatalf("add -rotation-window 2s: err %v, window %s", err, window())
	}
	if out, _, err := run("rotation-window", "spa", "500ms"); err != nil || out != "client spa: rotation window 500ms\n" || window() != "500ms" {
		t.Fatalf("rotation-window 500ms: err %v, printed %q, window %s", err, out, window())
	}
	for _, bad := range [][]string{{"spa", "6m"}, {"spa", "-1s"}, {"spa", "soon"}, {"spa"}} {
		_, msg, err := run(append([]string{"rotation-window"}, bad...)...)
		if !errors.Is(err, ErrUsage) || msg == "" {
			t.Errorf("rotation-window %v: err = %v, stderr %q; want a usage error with a message", bad, err, msg)
		}
	}
	if window() != "500ms" {
		t.Fatalf("a refused value changed the window to %s", window())
	}
	if _, _, err := run("rotation-window", "nobody", "1s"); !errors.Is(err, clients.ErrNotFound) {
		t.Fatalf("unknown client: err = %v", err)
	}
	if _, _, err := run("rotation-window", "spa", "default"); err != nil || window() != "default" {
		t.Fatalf("rotation-window default: err %v, window %s", err, window())
	}
	if _, msg, err := run("add", "other", "-grants", "password", "-rotation-window", "forever"); err == nil || !strings.Contains(err.Error(), "-rotation-window") {
		t.Fatalf("add with a bad window: err %v, stderr %q", err, msg)
	}
}
