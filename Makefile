# tokenpipe: the two commands a newcomer needs are `make demo` and `make test`.
GO        ?= go
BIN       ?= bin/tokenpipe
DEV_BIN   ?= bin/tokenpipe-dev
PKGS      ?= ./...
STATICCHECK_VERSION ?= v0.8.2

.PHONY: all build build-dev test demo bench lint vet staticcheck deploy-check fuzz chaos clean

all: build

## build: the production binary (no demo, bench or loadtest: it links
## neither an embedded NATS server nor the load generator).
build:
	$(GO) build -trimpath -o $(BIN) ./cmd/tokenpipe

## build-dev: the development binary, with demo, bench and loadtest.
build-dev:
	$(GO) build -trimpath -tags dev -o $(DEV_BIN) ./cmd/tokenpipe

## test: every test, against the local Postgres (127.0.0.1:5432) and NATS
## JetStream (127.0.0.1:4222); each test makes and removes its own database,
## stream and consumers.
test:
	$(GO) test -race -count=1 -timeout 20m -tags dev $(PKGS)

## demo: the whole pipeline in one process (embedded NATS unless
## TOKENPIPE_NATS_URL is set; Postgres at TOKENPIPE_DATABASE_URL). It stays
## up until Ctrl-C so the account and admin pages it prints can be opened;
## `make demo DEMO_ARGS=` exits after the summary.
DEMO_ARGS ?= -stay
demo:
	$(GO) run -tags dev ./cmd/tokenpipe demo $(DEMO_ARGS)

## bench: every end-to-end scenario with the roles as separate processes
## (bench e2e): highest sustained rate, conflict mix, sync, a 1M-row table,
## CPU per token per role at 3,000/s, at the peak and idle, and the drain
## against raw COPY; medians of 3 runs written into BENCHMARKS.md, about 17
## minutes on a quiet machine. The ramps step by 1,000/s from 1,000/s, so a
## mix that holds a fraction of the plain rate still has steps to hold.
## BENCH_FLAGS='-runs 3 -nats-server module' uses a nats-server built from
## the module instead of the machine's; bench e2e -h lists flags.
BENCH_FLAGS ?= -runs 3 -ramp-start 1000 -ramp-step 1000
bench: build-dev
	$(DEV_BIN) bench e2e $(BENCH_FLAGS) -write BENCHMARKS.md

## fuzz: a short run of every fuzz target (their seeds also run in make test).
## The budget is a count of executions, not a duration: Go 1.26's fuzzing
## coordinator can report a duration's end as "context deadline exceeded" on a
## loaded machine (go.dev/issue/75804, fixed in Go 1.27).
FUZZTIME ?= 30000x
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecodeTokenIssued -fuzztime $(FUZZTIME) ./events/
	$(GO) test -run '^$$' -fuzz FuzzCanonicalDecode -fuzztime $(FUZZTIME) ./events/
	$(GO) test -run '^$$' -fuzz FuzzParseRequest -fuzztime $(FUZZTIME) ./issuer/
	$(GO) test -run '^$$' -fuzz FuzzAccountHandler -fuzztime $(FUZZTIME) ./issuer/
	$(GO) test -run '^$$' -fuzz FuzzAdminHandler -fuzztime $(FUZZTIME) ./issuer/
	$(GO) test -run '^$$' -fuzz FuzzRevokeHandler -fuzztime $(FUZZTIME) ./issuer/
	$(GO) test -run '^$$' -fuzz FuzzIntrospectHandler -fuzztime $(FUZZTIME) ./issuer/
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime $(FUZZTIME) ./internal/tokens/

vet:
	$(GO) vet $(PKGS)
	$(GO) vet -tags dev $(PKGS)

staticcheck:
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) $(PKGS)
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) -tags dev $(PKGS)

lint: vet staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

## deploy-check: kustomize build of the Kubernetes manifests, strict decoding
## into the Kubernetes API types, and the Compose file. A separate Go module,
## so the service does not carry Kubernetes dependencies.
deploy-check:
	cd deploy/check && $(GO) test -count=1 ./...

clean:
	rm -rf bin

## chaos: the fault cases (real processes, own NATS and Postgres where a case
## kills them) with a 30 s Postgres outage and every NATS cluster case;
## writes RELIABILITY.md's tables from this run.
chaos:
	TOKENPIPE_TEST_PG_OUTAGE=30s TOKENPIPE_TEST_NATS_CLUSTER=full $(GO) test -count=1 -v -timeout 20m \
	  -run 'Killed|Survives|Outage|ScaleRoles|ConnectionsCut|NATSRollingRestart|NATSUnreachable|PoisonMixed' ./e2e/ | tee chaos.log | grep -E '^(---|ok|FAIL)'
	@{ sed -n '1,/<!-- chaos:begin -->/p' RELIABILITY.md; \
	   echo "Run on $$(date -u +'%Y-%m-%d %H:%M UTC') with \`make chaos\`."; echo; \
	   echo "| case | load offered | tokens issued | lost | duplicated | keys with 2 ACTIVE | fault end to clean audit |"; \
	   echo "|---|---|---|---|---|---|---|"; \
	   grep -o 'RELIABILITY|.*' chaos.log | awk -F'|' '{printf "| %s | %s | %s | %s | %s | %s | %s |\n", $$2, $$3, $$4, $$5, $$6, $$7, $$8}'; \
	   sed -n '/<!-- chaos:end -->/,$$p' RELIABILITY.md; } > RELIABILITY.md.new && mv RELIABILITY.md.new RELIABILITY.md
	@{ sed -n '1,/<!-- chaos-nats:begin -->/p' RELIABILITY.md; \
	   echo "| case | requests | answered 200 | 503 (first sent to last answered) | other failures | HTTP p99 before / during the fault | persister lag (read from the consumer leader) | every token answered until the fault ended has its row | lost / duplicated / keys with 2 ACTIVE | what happened |"; \
	   echo "|---|---|---|---|---|---|---|---|---|---|"; \
	   grep -o 'NATSHA|.*' chaos.log | awk -F'|' '{printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $$2, $$3, $$4, $$5, $$6, $$7, $$8, $$9, $$10, $$11}'; \
	   sed -n '/<!-- chaos-nats:end -->/,$$p' RELIABILITY.md; } > RELIABILITY.md.new && mv RELIABILITY.md.new RELIABILITY.md
	@rm -f chaos.log
