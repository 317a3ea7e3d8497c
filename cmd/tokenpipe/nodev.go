//go:build !dev

package main

import "github.com/tokenpipe/tokenpipe/internal/app"

// devCommands: the production build carries no development tools, so it
// links neither the embedded NATS server nor the load generator.
func devCommands() map[string]app.Command { return nil }

const devNote = `
available in the development build (make demo, make build-dev, or go build -tags dev):
  demo       run the whole pipeline in one process and exercise it
  bench      measure the pipeline against raw ceilings (drain)
  loadtest   drive an issuer at a fixed rate and measure queue lag`

// devOnly are the commands of the development build.
var devOnly = map[string]bool{"demo": true, "bench": true, "loadtest": true}
