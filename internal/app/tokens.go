package app

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/grants"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

const keygenUsage = `usage: tokenpipe keygen

Prints a new random 32-byte token signing key, base64url encoded, for
TOKENPIPE_TOKEN_KEYS. Every issuer must have the same keys. To rotate, list
the new key second, roll it out, move it first, roll out again, and drop the
old key once the tokens it signed have expired (TOKENPIPE_REFRESH_TTL).`

func RunKeygen(_ context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		fmt.Fprintln(stderr, keygenUsage)
		if args[0] == "-h" || args[0] == "--help" {
			return nil
		}
		return ErrUsage
	}
	_, err := fmt.Fprintln(stdout, RandomKey())
	return err
}

// RandomKey returns 32 random bytes, base64url: a token key or admin token.
func RandomKey() string {
	b := make([]byte, tokens.KeyMinBytes)
	_, _ = rand.Read(b) // never fails (crypto/rand panics instead)
	return base64.RawURLEncoding.EncodeToString(b)
}

const tokensUsage = `apps|list|revoke ...

  apps -user U              applications holding live tokens for user U
  list -client C [-user U] [-state S] [-limit N]
                            a client's stored tokens, newest first
  revoke -client C [-user U]
                            revoke the client's tokens for user U, or for every
                            user without -user; tokens still queued included
  revoke -user U            revoke user U's tokens at every client: after a
                            password reset or when removing the user

Tokens are shown by the first 16 hex digits of their SHA-256 digest: the
plaintext is never stored. Output is a table, or JSON with -json.

revoke reads the stream's last sequence first (the watermark that reaches
queued tokens) and then notifies issuers to drop cached introspection
answers; with -no-stream (sync-mode deployments, no NATS) it only needs
Postgres.

Examples:
  tokenpipe tokens apps -user alice
  tokenpipe tokens list -client mobile -state ACTIVE -limit 20
  tokenpipe tokens revoke -client mobile -user alice
  tokenpipe tokens revoke -user alice`

func RunTokens(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg Common
	rest, err := LoadConfig("tokens", args, stderr, &cfg, tokensUsage)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) == 0 {
		fmt.Fprintln(stderr, "usage: tokenpipe tokens "+tokensUsage)
		return ErrUsage
	}
	fs := flag.NewFlagSet("tokens "+rest[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	client := fs.String("client", "", "client id")
	user := fs.String("user", "", "user (subject)")
	state := fs.String("state", "", "list: only tokens in this state (ACTIVE, INACTIVE, REVOKED, EXPIRED)")
	limit := fs.Int("limit", 100, "list: most tokens shown")
	asJSON := fs.Bool("json", false, "print JSON")
	noStream := fs.Bool("no-stream", false, "revoke: no JetStream (sync-mode deployment)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tokenpipe tokens "+tokensUsage+"\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(rest[1:]); err != nil {
		return FlagErr(err)
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return ErrUsage
	}
	need := func(name, v string) error {
		if v == "" {
			fmt.Fprintf(stderr, "tokenpipe tokens %s: -%s is required\n", rest[0], name)
			return ErrUsage
		}
		return nil
	}
	pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	switch rest[0] {
	case "apps":
		if err := need("user", *user); err != nil {
			return err
		}
		apps, err := grants.Applications(ctx, pool, *user)
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(stdout).Encode(apps)
		}
		tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CLIENT\tSCOPES\tTOKENS\tISSUED\tEXPIRES\tREFRESH EXPIRES")
		for _, a := range apps {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", a.ClientID, strings.Join(a.Scopes, " "), a.Tokens,
				stamp(a.IssuedAt), stamp(a.ExpiresAt), stampPtr(a.RefreshExpiresAt))
		}
		return tw.Flush()
	case "list":
		if err := need("client", *client); err != nil {
			return err
		}
		toks, err := grants.ClientTokens(ctx, pool, *client, grants.Filter{Subject: *user, State: strings.ToUpper(*state), Limit: *limit})
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(stdout).Encode(toks)
		}
		tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tSUB\tSCOPE\tSTATE\tGRANT\tISSUED\tEXPIRES")
		for _, t := range toks {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", t.ID, t.Subject, t.Scope, t.State, t.GrantType, stamp(t.IssuedAt), stamp(t.ExpiresAt))
		}
		return tw.Flush()
	case "revoke":
		if *client == "" && *user == "" {
			return need("client", *client)
		}
		return tokensRevoke(ctx, &cfg, *client, *user, *noStream, stdout, stderr)
	}
	fmt.Fprintf(stderr, "tokenpipe tokens: unknown subcommand %q\nusage: tokenpipe tokens %s\n", rest[0], tokensUsage)
	return ErrUsage
}

func tokensRevoke(ctx context.Context, cfg *Common, client, user string, noStream bool, stdout, stderr io.Writer) error {
	pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	revokeGrant := func(js jetstream.JetStream, stream string) (store.Revocation, error) {
		if client == "" {
			return grants.RevokeUser(ctx, pool, js, stream, user, store.ReasonAdmin)
		}
		return grants.Revoke(ctx, pool, js, stream, client, user, store.ReasonAdmin)
	}
	if noStream {
		res, err := revokeGrant(nil, "")
		if err != nil {
			return err
		}
		return reportRevoke(stdout, client, user, res)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	nc, js, err := ConnectNATS(cfg, "tokenpipe-tokens", log, nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	res, err := revokeGrant(js, cfg.Stream)
	if err != nil {
		return err
	}
	// The revocation is committed; the notice only shortens how long
	// issuers keep serving cached introspection answers.
	n := store.Notice(res, store.ReasonAdmin)
	n.ClientID, n.Subject = client, user
	if body, err := events.EncodeTokenRevoked(n); err == nil {
		err := nc.Publish(cfg.Topology().RevokedSubject(), body)
		if err == nil {
			err = nc.FlushTimeout(5 * time.Second)
		}
		if err != nil {
			fmt.Fprintf(stderr, "warning: revocation notice not sent (%v); issuers drop cached answers within TOKENPIPE_INTROSPECT_CACHE_TTL\n", err)
		}
	}
	return reportRevoke(stdout, client, user, res)
}

func reportRevoke(stdout io.Writer, client, user string, res store.Revocation) error {
	who := "every user"
	if user != "" {
		who = "user " + user
	}
	where := "client " + client
	if client == "" {
		where = "every client"
	}
	_, err := fmt.Fprintf(stdout, "revoked the tokens of %s for %s: %d stored tokens changed, %d families revoked\n", where, who, len(res.Digests), res.Families)
	return err
}

func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }

func stampPtr(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return stamp(*t)
}
