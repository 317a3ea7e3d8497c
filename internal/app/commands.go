package app

import (
	"context"
	"errors"
	"io"
)

// Command is one subcommand. Run gets a context that is cancelled on SIGINT
// or SIGTERM; a role treats that as the start of a graceful drain.
type Command struct {
	Summary string
	Run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

// ErrUsage asks main to exit 2 without printing the error again.
var ErrUsage = errors.New("usage")

// Commands are the production binary's roles and operator commands.
func Commands() map[string]Command {
	return map[string]Command{
		"issuer":    {"serve the OAuth2 token endpoint", RunIssuer},
		"persister": {"write token events to Postgres in batches", RunPersister},
		"recovery":  {"resolve one-ACTIVE-token conflicts", RunRecovery},
		"migrate":   {"apply or list database migrations (up|status)", RunMigrate},
		"client":    {"manage OAuth clients (add|list|introspect|remove)", RunClient},
		"user":      {"manage password-grant users (add|remove)", RunUser},
		"audit":     {"check that every issued token has exactly one row and one ACTIVE per key", RunAudit},
		"replay":    {"re-drive a range of the token stream through persistence", RunReplay},
		"dlq":       {"list, show, replay or purge dead letters", RunDLQ},
		"status":    {"show the stream, its consumers and row counts", RunStatus},
		"tokens":    {"list a user's applications or a client's tokens; revoke them (apps|list|revoke)", RunTokens},
		"cleanup":   {"delete expired token rows, old rotations and revocations in bounded batches", RunCleanup},
		"keygen":    {"print a new token signing key for TOKENPIPE_TOKEN_KEYS", RunKeygen},
	}
}
