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
)

// command is one subcommand. run gets a context that is cancelled on SIGINT or
// SIGTERM; a role treats that as the start of a graceful drain.
type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

// errUsage asks main to exit 2 without printing the error again.
var errUsage = errors.New("usage")

func commands() map[string]command {
	return map[string]command{
		"issuer":    {"serve the OAuth2 token endpoint", runIssuer},
		"persister": {"write token events to Postgres in batches", runPersister},
		"recovery":  {"resolve one-ACTIVE-token conflicts", runRecovery},
		"migrate":   {"apply or list database migrations (up|status)", runMigrate},
		"client":    {"manage OAuth clients (add|list|introspect|remove)", runClient},
		"user":      {"manage password-grant users (add|remove)", runUser},
		"demo":      {"run the whole pipeline in one process and exercise it", runDemo},
		"bench":     {"measure the pipeline against raw ceilings (drain)", runBench},
		"loadtest":  {"drive an issuer at a fixed rate and measure queue lag", runLoadtest},
		"audit":     {"check that every issued token has exactly one row and one ACTIVE per key", runAudit},
		"replay":    {"re-drive a range of the token stream through persistence", runReplay},
		"dlq":       {"list, show, replay or purge dead letters", runDLQ},
		"status":    {"show the stream, its consumers and row counts", runStatus},
		"tokens":    {"list a user's applications or a client's tokens; revoke them (apps|list|revoke)", runTokens},
		"cleanup":   {"delete expired token rows, old rotations and revocations in bounded batches", runCleanup},
		"keygen":    {"print a new token signing key for TOKENPIPE_TOKEN_KEYS", runKeygen},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmds := commands()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr, cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "tokenpipe: unknown command %q\n", args[0])
		usage(stderr, cmds)
		return 2
	}
	err := cmd.run(ctx, args[1:], stdout, stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintf(stderr, "tokenpipe %s: %v\n", args[0], err)
		return 1
	}
}

func usage(w io.Writer, cmds map[string]command) {
	fmt.Fprintln(w, "usage: tokenpipe <command> [-h] [args]")
	fmt.Fprintln(w, "\ncommands:")
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, cmds[n].summary)
	}
	fmt.Fprintln(w, "\nEvery command reads its configuration from TOKENPIPE_* environment variables;")
	fmt.Fprintln(w, "'tokenpipe <command> -h' lists them with their defaults.")
}
