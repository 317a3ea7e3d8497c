// Package cli holds the development commands (demo, bench, loadtest). They
// link an embedded NATS server, the load generator and its histograms, so
// only the development build of tokenpipe (go build -tags dev) carries them.
package cli

import "github.com/tokenpipe/tokenpipe/internal/app"

// Commands are the development build's extra subcommands.
func Commands() map[string]app.Command {
	return map[string]app.Command{
		"demo":         {Summary: "run the whole pipeline in one process and exercise it", Run: runDemo},
		"bench":        {Summary: "measure the pipeline against raw ceilings (drain, matrix) and its CPU per token per role (roles)", Run: runBench},
		"loadtest":     {Summary: "drive an issuer at a fixed rate and measure queue lag", Run: runLoadtest},
		"rotationtest": {Summary: "replay API requests through the per-request rotation middleware, rotation on or off", Run: runRotationtest},
	}
}
