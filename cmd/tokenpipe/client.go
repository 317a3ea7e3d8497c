package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tokenpipe/tokenpipe/clients"
)

// RegistryConfig is what client and user management needs.
type RegistryConfig struct {
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/tokenpipe?sslmode=disable" desc:"Postgres URL"`
	BcryptCost  int    `envconfig:"BCRYPT_COST" default:"10" desc:"bcrypt cost for user passwords (user add)"`
}

const clientUsage = `add|list|remove ...

  add ID [-scopes "a b"] [-grants client_credentials,password]
          register a client; prints its secret ONCE (only a digest is stored)
  list    list clients (never secrets)
  remove ID
          delete a client; issuers stop accepting it within TOKENPIPE_CLIENT_CACHE_TTL

Examples:
  tokenpipe client add billing -scopes "invoices:read invoices:write"
  tokenpipe client add mobile -scopes "profile" -grants password,refresh_token
  tokenpipe client list`

const userUsage = `add|remove ...

  add USERNAME     register a password-grant user; the password is read from
                   TOKENPIPE_USER_PASSWORD or the first line of standard input
  remove USERNAME  delete a user

Examples:
  printf 'correct horse battery\n' | tokenpipe user add alice
  tokenpipe user remove alice`

func runClient(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg RegistryConfig
	rest, err := loadConfig("client", args, stderr, &cfg, clientUsage)
	if err != nil {
		return helpIsNil(err)
	}
	if len(rest) == 0 {
		fmt.Fprintln(stderr, "usage: tokenpipe client "+clientUsage)
		return errUsage
	}
	pool, err := connectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	switch rest[0] {
	case "add":
		fs := flag.NewFlagSet("client add", flag.ContinueOnError)
		fs.SetOutput(stderr)
		scopes := fs.String("scopes", "", "space-separated scopes the client may request")
		grants := fs.String("grants", "client_credentials", "comma-separated grants: client_credentials, password, refresh_token")
		if len(rest) < 2 || strings.HasPrefix(rest[1], "-") {
			fmt.Fprintln(stderr, "usage: tokenpipe client add ID [-scopes \"a b\"] [-grants g1,g2]")
			return errUsage
		}
		if err := fs.Parse(rest[2:]); err != nil {
			return helpIsNil(flagErr(err))
		}
		secret, err := clients.Add(ctx, pool, rest[1], strings.Fields(*scopes), strings.Split(*grants, ","))
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "client_id:     %s\nclient_secret: %s\n", rest[1], secret)
		fmt.Fprintln(stderr, "The secret is shown only this once; only its digest is stored.")
		return nil
	case "list":
		list, err := clients.List(ctx, pool)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "CLIENT\tGRANTS\tSCOPES\tCREATED")
		for _, c := range list {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.ID, strings.Join(c.Grants, ","), strings.Join(c.Scopes, " "), c.CreatedAt.UTC().Format(time.RFC3339))
		}
		return tw.Flush()
	case "remove":
		if len(rest) != 2 {
			fmt.Fprintln(stderr, "usage: tokenpipe client remove ID")
			return errUsage
		}
		if err := clients.Remove(ctx, pool, rest[1]); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "removed client %s\n", rest[1])
		return nil
	}
	fmt.Fprintln(stderr, "usage: tokenpipe client "+clientUsage)
	return errUsage
}
