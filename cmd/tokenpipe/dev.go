//go:build dev

package main

import (
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/dev/cli"
)

// devCommands: this is the development build (go build -tags dev), with
// demo, bench and loadtest.
func devCommands() map[string]app.Command { return cli.Commands() }

const devNote = ""

var devOnly = map[string]bool{}
