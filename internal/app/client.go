package app

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// RegistryConfig is what client and user management needs. It does not embed
// Common: these commands only talk to Postgres, and their -h should not list
// a dozen NATS and stream variables they ignore.
type RegistryConfig struct {
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/tokenpipe?sslmode=disable" desc:"Postgres URL"`
	BcryptCost  int    `envconfig:"BCRYPT_COST" default:"10" desc:"bcrypt cost for user passwords (user add)"`
}

func (c *RegistryConfig) validate() error {
	switch {
	case c.DatabaseURL == "":
		return fmt.Errorf("%s_DATABASE_URL: is empty", EnvPrefix)
	case c.BcryptCost < 4 || c.BcryptCost > 31:
		return fmt.Errorf("%s_BCRYPT_COST: %d is not between 4 and 31", EnvPrefix, c.BcryptCost)
	}
	return nil
}

const clientUsage = `add|list|grant|introspect|rotation-window|remove ...

  add ID [-scopes "a b"] [-grants client_credentials,password] [-introspect] [-rotation-window 2s]
          register a client; prints its secret ONCE (only a digest is stored);
          -introspect registers a resource server
  list    list clients (never secrets)
  grant ID GRANT on|off
          allow a client one grant (client_credentials, password, refresh_token), or withdraw it
  introspect ID on|off
          let a client introspect other clients' tokens (a resource server), or stop it
  rotation-window ID DURATION|default
          the client's own batch window for per-request rotation, or back to
          TOKENPIPE_ROTATION_WINDOW
  remove ID
          delete a client; issuers stop accepting it within TOKENPIPE_CLIENT_CACHE_TTL

Examples:
  tokenpipe client add billing -scopes "invoices:read invoices:write"
  tokenpipe client add mobile -scopes "profile" -grants password,refresh_token
  tokenpipe client add api -grants "" -introspect
  tokenpipe client grant mobile refresh_token off
  tokenpipe client rotation-window spa 2s
  tokenpipe client list
  tokenpipe client remove billing
  tokenpipe client add -h`

const clientAddUsage = `usage: tokenpipe client add ID [-scopes "a b"] [-grants g1,g2] [-introspect] [-rotation-window D]

Registers client ID and prints its secret. The secret is shown only this once:
only its SHA-256 digest is stored, so a lost secret means removing and adding
the client again. ID is 1 to 128 printable bytes without spaces or ':'.
Scopes are RFC 6749 scope tokens; grants are client_credentials, password
and refresh_token. A token request without a scope parameter gets all of the
client's scopes. ID may not be a user's name: a token's subject is a user
name or, for client_credentials, the client's id.

-introspect registers a resource server: it may introspect every client's
tokens at POST /oauth2/introspect. Any other client learns only about its own
tokens (active=false for the rest). A resource server that only checks
tokens needs no grant: -grants "".

-rotation-window gives the client its own batch window for per-request
rotation (see tokenpipe client rotation-window -h); without it the issuers'
TOKENPIPE_ROTATION_WINDOW applies.

Examples:
  tokenpipe client add billing -scopes "invoices:read invoices:write"
  tokenpipe client add mobile --scopes "profile email" --grants client_credentials,password
  tokenpipe client add api --grants "" --introspect

Flags:`

const clientListUsage = `usage: tokenpipe client list

Prints every client with its grants, whether it may introspect other
clients' tokens, its scopes and creation time. Secrets are never shown: only
their digests are stored.

Example:
  tokenpipe client list`

const clientIntrospectUsage = `usage: tokenpipe client introspect ID on|off

Lets client ID introspect every client's tokens (on: a resource server), or
only its own (off). Issuers apply the change within
TOKENPIPE_CLIENT_CACHE_TTL.

Example:
  tokenpipe client introspect api on`

const clientRotationWindowUsage = `usage: tokenpipe client rotation-window ID DURATION|default

Sets client ID's own batch window for per-request rotation (token
exchange): a token exchanged for its successor stays valid this long after
the first answered exchange, and exchanges inside it get the same
successor. DURATION is 0 (the token ends when its exchange is answered) to
5m, in whole milliseconds; "default" returns the client to the issuers'
TOKENPIPE_ROTATION_WINDOW. In async mode a window not shorter than
TOKENPIPE_DUPLICATE_WINDOW is ignored for the issuers' own. Issuers apply
the change within TOKENPIPE_CLIENT_CACHE_TTL, to tokens exchanged after it.

Examples:
  tokenpipe client rotation-window spa 2s
  tokenpipe client rotation-window spa default`

const clientGrantUsage = `usage: tokenpipe client grant ID GRANT on|off

Allows client ID one more grant (on) or withdraws it (off); its other grants
stay as they are. GRANT is client_credentials, password or refresh_token.
With refresh_token off the client's refresh requests get unauthorized_client
and its password sign-ins no longer return a refresh token; the tokens it
already holds are not revoked (tokenpipe tokens revoke -client ID does
that). Issuers apply the change within TOKENPIPE_CLIENT_CACHE_TTL.

Example:
  tokenpipe client grant mobile refresh_token off`

const clientRemoveUsage = `usage: tokenpipe client remove ID

Deletes client ID. Issuers that cached it keep accepting it for up to
TOKENPIPE_CLIENT_CACHE_TTL; tokens already issued stay as they are.

Example:
  tokenpipe client remove billing`

func RunClient(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg RegistryConfig
	rest, err := LoadConfig("client", args, stderr, &cfg, clientUsage)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) == 0 {
		fmt.Fprintln(stderr, "usage: tokenpipe client "+clientUsage)
		return ErrUsage
	}
	switch rest[0] {
	case "add":
		return clientAdd(ctx, &cfg, rest[1:], stdout, stderr)
	case "list":
		if _, err := positional(rest[1:], 0, clientListUsage, stderr); err != nil {
			return HelpIsNil(err)
		}
		pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
		if err != nil {
			return err
		}
		defer pool.Close()
		list, err := clients.List(ctx, pool)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CLIENT\tGRANTS\tINTROSPECT\tROTATION WINDOW\tSCOPES\tCREATED")
		for _, c := range list {
			grants, introspect := strings.Join(c.Grants, ","), "own"
			if grants == "" {
				grants = "-"
			}
			if c.Introspect {
				introspect = "all"
			}
			window := "default"
			if c.RotationWindow != nil {
				window = c.RotationWindow.String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", c.ID, grants, introspect, window, strings.Join(c.Scopes, " "), c.CreatedAt.UTC().Format(time.RFC3339))
		}
		return tw.Flush()
	case "grant":
		return clientGrant(ctx, &cfg, rest[1:], stdout, stderr)
	case "introspect":
		pos, err := positional(rest[1:], 2, clientIntrospectUsage, stderr)
		if err != nil {
			return HelpIsNil(err)
		}
		if pos[1] != "on" && pos[1] != "off" {
			fmt.Fprintln(stderr, clientIntrospectUsage)
			return ErrUsage
		}
		pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
		if err != nil {
			return err
		}
		defer pool.Close()
		if err := clients.SetIntrospect(ctx, pool, pos[0], pos[1] == "on"); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "client %s: introspect %s\n", pos[0], pos[1])
		return nil
	case "rotation-window":
		return clientRotationWindow(ctx, &cfg, rest[1:], stdout, stderr)
	case "remove":
		pos, err := positional(rest[1:], 1, clientRemoveUsage, stderr)
		if err != nil {
			return HelpIsNil(err)
		}
		pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
		if err != nil {
			return err
		}
		defer pool.Close()
		if err := clients.Remove(ctx, pool, pos[0]); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "removed client %s\n", pos[0])
		return nil
	}
	fmt.Fprintf(stderr, "tokenpipe client: unknown subcommand %q\nusage: tokenpipe client %s\n", rest[0], clientUsage)
	return ErrUsage
}

func clientAdd(ctx context.Context, cfg *RegistryConfig, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("client add", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, clientAddUsage)
		fs.PrintDefaults()
	}
	scopes := fs.String("scopes", "", "space-separated scopes the client may request")
	grants := fs.String("grants", "client_credentials", "comma-separated grants: client_credentials, password, refresh_token, "+tokens.GrantTokenExchange)
	introspect := fs.Bool("introspect", false, "a resource server: may introspect every client's tokens")
	window := fs.String("rotation-window", "", "the client's own per-request rotation window (0 to 5m); empty: TOKENPIPE_ROTATION_WINDOW")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return HelpIsNil(FlagErr(err))
	}
	if len(pos) != 1 {
		fs.Usage()
		return ErrUsage
	}
	opts := clients.Options{Introspect: *introspect}
	if *window != "" {
		if opts.RotationWindow, err = parseRotationWindow(*window); err != nil {
			return fmt.Errorf("-rotation-window: %w", err)
		}
	}
	var grantList []string
	for _, g := range strings.Split(*grants, ",") {
		if g = strings.TrimSpace(g); g != "" {
			grantList = append(grantList, g)
		}
	}
	pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	secret, err := clients.AddWith(ctx, pool, pos[0], strings.Fields(*scopes), grantList, opts)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "client_id:     %s\nclient_secret: %s\n", pos[0], secret)
	fmt.Fprintln(stderr, "The secret is shown only this once; only its digest is stored.")
	return nil
}

func clientGrant(ctx context.Context, cfg *RegistryConfig, args []string, stdout, stderr io.Writer) error {
	pos, err := positional(args, 3, clientGrantUsage, stderr)
	if err != nil {
		return HelpIsNil(err)
	}
	if (pos[2] != "on" && pos[2] != "off") || !clients.KnownGrant(pos[1]) {
		fmt.Fprintln(stderr, clientGrantUsage)
		return ErrUsage
	}
	pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := clients.SetGrant(ctx, pool, pos[0], pos[1], pos[2] == "on"); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "client %s: %s %s\n", pos[0], pos[1], pos[2])
	return nil
}

func clientRotationWindow(ctx context.Context, cfg *RegistryConfig, args []string, stdout, stderr io.Writer) error {
	pos, err := positional(args, 2, clientRotationWindowUsage, stderr)
	if err != nil {
		return HelpIsNil(err)
	}
	var window *time.Duration
	if pos[1] != "default" {
		if window, err = parseRotationWindow(pos[1]); err != nil {
			fmt.Fprintf(stderr, "tokenpipe client rotation-window: %v\n", err)
			return ErrUsage
		}
	}
	pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := clients.SetRotationWindow(ctx, pool, pos[0], window); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "client %s: rotation window %s\n", pos[0], pos[1])
	return nil
}

// parseRotationWindow reads a client's rotation window (a Go duration).
func parseRotationWindow(text string) (*time.Duration, error) {
	w, err := time.ParseDuration(text)
	if err != nil {
		return nil, fmt.Errorf("rotation window %q: not a duration (like 2s or 500ms)", text)
	}
	if err := clients.ValidRotationWindow(w); err != nil {
		return nil, err
	}
	return &w, nil
}

// parseInterleaved parses flags given before, between or after positional
// arguments ("add ID -scopes x" and "add -scopes x ID" alike) and returns the
// positional ones.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// positional returns the arguments of a subcommand that takes exactly n of
// them and no flags; -h prints its usage and returns ErrHelp.
func positional(args []string, n int, usage string, stderr io.Writer) ([]string, error) {
	fs := flag.NewFlagSet("", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprintln(stderr, usage) }
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return nil, FlagErr(err)
	}
	if len(pos) != n {
		fs.Usage()
		return nil, ErrUsage
	}
	return pos, nil
}
