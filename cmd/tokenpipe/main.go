// Command tokenpipe is the OAuth2 token service and its operator tools. One
// binary, one role per subcommand, all configuration from TOKENPIPE_*
// environment variables.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"

	"github.com/tokenpipe/tokenpipe/internal/app"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmds := app.Commands()
	for name, c := range devCommands() {
		cmds[name] = c
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr, cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := cmds[args[0]]
	if !ok && devOnly[args[0]] {
		fmt.Fprintf(stderr, "tokenpipe %s is available in the development build: make demo, make build-dev, or go build -tags dev ./cmd/tokenpipe\n", args[0])
		return 2
	}
	if !ok {
		fmt.Fprintf(stderr, "tokenpipe: unknown command %q\n", args[0])
		usage(stderr, cmds)
		return 2
	}
	err := cmd.Run(ctx, args[1:], stdout, stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, app.ErrUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "tokenpipe %s: %v\n", args[0], err)
		return 1
	}
}

func usage(w io.Writer, cmds map[string]app.Command) {
	fmt.Fprintln(w, "usage: tokenpipe <command> [-h] [args]")
	fmt.Fprintln(w, "\ncommands:")
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, cmds[n].Summary)
	}
	if devNote != "" {
		fmt.Fprintln(w, devNote)
	}
	fmt.Fprintln(w, "\nEvery command reads its configuration from TOKENPIPE_* environment variables;")
	fmt.Fprintln(w, "'tokenpipe <command> -h' lists them with their defaults.")
}
