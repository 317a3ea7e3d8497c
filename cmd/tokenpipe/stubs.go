package main

// Commands whose implementation is being written in parallel; each moves to
// its own file and leaves this list.

import (
	"context"
	"errors"
	"io"
)

var errNotBuilt = errors.New("not built yet")

func runDemo(context.Context, []string, io.Writer, io.Writer) error { return errNotBuilt }
