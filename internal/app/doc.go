// Package app is what cmd/tokenpipe dispatches to: the TOKENPIPE_*
// configuration and its validation, the NATS and Postgres connections (with
// credentials redacted from every message), the roles' lifecycle (ops
// server, readiness, graceful drain on SIGTERM), the operator commands and
// their output, and StartPipeline, the one wiring of issuer, persister and
// recovery that the roles, the demo, the benchmarks and the tests share.
package app
