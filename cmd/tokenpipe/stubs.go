package main

// Commands whose implementation is being written in parallel; each moves to
// its own file and leaves this list.

import (
	"context"
	"errors"
	"io"
)

var errNotBuilt = errors.New("not built yet")

func runIssuer(context.Context, []string, io.Writer, io.Writer) error { return errNotBuilt }
func runClient(context.Context, []string, io.Writer, io.Writer) error { return errNotBuilt }
func runUser(context.Context, []string, io.Writer, io.Writer) error   { return errNotBuilt }
func runDemo(context.Context, []string, io.Writer, io.Writer) error   { return errNotBuilt }
