package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/tokenpipe/tokenpipe/clients"
)

func runUser(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg RegistryConfig
	rest, err := loadConfig("user", args, stderr, &cfg, userUsage)
	if err != nil {
		return helpIsNil(err)
	}
	if len(rest) != 2 || (rest[0] != "add" && rest[0] != "remove") {
		fmt.Fprintln(stderr, "usage: tokenpipe user "+userUsage)
		return errUsage
	}
	pool, err := connectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	if rest[0] == "remove" {
		if err := clients.RemoveUser(ctx, pool, rest[1]); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "removed user %s\n", rest[1])
		return nil
	}
	// The password never travels as an argument, where ps and shell history
	// would see it.
	password := os.Getenv(envPrefix + "_USER_PASSWORD")
	if password == "" {
		line, err := bufio.NewReader(os.Stdin).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read password: %w", err)
		}
		password = strings.TrimRight(line, "\r\n")
	}
	if err := clients.AddUser(ctx, pool, rest[1], password, cfg.BcryptCost); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "added user %s\n", rest[1])
	return nil
}
