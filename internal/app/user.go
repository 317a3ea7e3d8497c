package app

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/tokenpipe/tokenpipe/internal/clients"
)

const userUsage = `add|remove ...

  add USERNAME     register a password-grant user, or reset their password; the
                   password is read from TOKENPIPE_USER_PASSWORD or the first
                   line of standard input, never from an argument
  remove USERNAME  delete a user

Examples:
  printf 'correct horse battery\n' | tokenpipe user add alice
  TOKENPIPE_USER_PASSWORD='correct horse battery' TOKENPIPE_BCRYPT_COST=12 tokenpipe user add alice
  tokenpipe user remove alice
  tokenpipe user add -h`

const userAddUsage = `usage: tokenpipe user add USERNAME

Registers USERNAME for the password grant, or replaces their password. The
password (8 to 72 bytes) is read from TOKENPIPE_USER_PASSWORD or else the first
line of standard input, so it appears in neither ps nor shell history. Only a
bcrypt hash of cost TOKENPIPE_BCRYPT_COST is stored.

Examples:
  printf 'correct horse battery\n' | tokenpipe user add alice
  TOKENPIPE_USER_PASSWORD='correct horse battery' tokenpipe user add alice`

const userRemoveUsage = `usage: tokenpipe user remove USERNAME

Deletes USERNAME; tokens already issued to them stay as they are.

Example:
  tokenpipe user remove alice`

func RunUser(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg RegistryConfig
	rest, err := LoadConfig("user", args, stderr, &cfg, userUsage)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) == 0 || (rest[0] != "add" && rest[0] != "remove") {
		fmt.Fprintln(stderr, "usage: tokenpipe user "+userUsage)
		return ErrUsage
	}
	usage := userAddUsage
	if rest[0] == "remove" {
		usage = userRemoveUsage
	}
	pos, err := positional(rest[1:], 1, usage, stderr)
	if err != nil {
		return HelpIsNil(err)
	}
	username := pos[0]
	var password string
	if rest[0] == "add" {
		if password, err = readPassword(); err != nil {
			return err
		}
	}
	pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	if rest[0] == "remove" {
		if err := clients.RemoveUser(ctx, pool, username); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "removed user %s\n", username)
		return nil
	}
	if err := clients.AddUser(ctx, pool, username, password, cfg.BcryptCost); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "added user %s\n", username)
	return nil
}

// readPassword takes the password from the environment or standard input:
// an argument would show in ps and shell history.
func readPassword() (string, error) {
	if p := os.Getenv(EnvPrefix + "_USER_PASSWORD"); p != "" {
		return p, nil
	}
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read password: %w", err)
	}
	return strings.TrimRight(line, "\r\n"), nil
}
