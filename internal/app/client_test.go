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
