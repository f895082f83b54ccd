# Everything a fresh machine needs is installed by these targets themselves.
SHELL := /bin/bash
GO    ?= go

GO_SOURCES := $(shell find . -name '*.go' -not -path './.git/*' -not -name '*_test.go')

.PHONY: run standin test build deps test-deps clean bench bench-scarce bench-features bench-burst bench-capacity soak fuzz

## run: start the proxy. Without VIGTHORIA_API_KEY: a local stand-in
## upstream and the proxy in front of it. With it: the real API,
## configured by Caddyfile.example.
## Ctrl-C stops it with exit status 0: the demo and Caddy stop cleanly,
## and the shell execs them, so that no go run or shell reports the
## signal as a failure.
run: build
	@if [ -z "$$VIGTHORIA_API_KEY" ]; then \
		$(GO) build -o bin/demo ./internal/cmd/demo && exec bin/demo -caddy ./caddy; \
	else \
		exec ./caddy run --config Caddyfile.example --adapter caddyfile; \
	fi

## standin: the stand-in for the Vigthoria API on its own (STANDIN_PORT,
## default 9090), to try a Caddyfile of your own without an account.
standin:
	@$(GO) build -o bin/standin ./internal/cmd/standin && exec bin/standin

## test: vet, run every test with the race detector (the fuzz targets'
## seed corpora among them), and fuzz 1000 inputs of each target whose
## package builds in seconds. vet builds with -race so that it shares the
## tests' build of Caddy instead of making one of its own.
test: test-deps
	$(GO) vet -race ./...
	$(GO) test -race -count=1 -timeout 25m ./...
	@$(MAKE) --no-print-directory fuzz FUZZTIME=1000x FUZZ_TARGETS="$(LEAF_FUZZ_TARGETS)"

## fuzz: each fuzz target for FUZZTIME (default 2m): client keys and
## Authorization headers, the request's policed fields and body edits
## (against encoding/json), the JSON validator (against encoding/json),
## the usage reader, the SSE tap, the JWT verifier (against go-jose), model
## globs (against path.Match), the Caddyfile syntax and the token requests
## of POST /vigthoria/tokens.
## Fuzzing instruments every package a target's test binary holds: the
## targets in leaf packages (standard library only) build in seconds,
## the others rebuild Caddy and SQLite instrumented, minutes on a fresh
## machine. make test fuzzes the leaf ones 1000 inputs each (a count, not
## a time, which a busy machine could cut short) and runs the others'
## seed corpora as tests. Each package's instrumented test binary is
## built once and runs each of its targets, with the corpus where go test
## -fuzz keeps it.
FUZZTIME ?= 2m
LEAF_FUZZ_TARGETS := FuzzValid:./caller/clientkey FuzzFromAuthorization:./caller/clientkey \
	FuzzRequestEdits:./proxy/wire FuzzPolicedFields:./proxy/wire FuzzValidJSON:./proxy/wire FuzzParseUsage:./proxy/wire \
	FuzzSSEBody:./proxy/wire
FUZZ_TARGETS := $(LEAF_FUZZ_TARGETS) FuzzVerifyToken:./caller/token FuzzMatchModel:./policy \
	FuzzUnmarshalCaddyfile:. FuzzTokenRequest:.
fuzz:
	@set -e; bins=$$(mktemp -d); trap 'rm -rf "$$bins"' EXIT; cache=$$($(GO) env GOCACHE)/fuzz; \
	for t in $(FUZZ_TARGETS); do \
		name=$${t%%:*}; pkg=$${t#*:}; path=$$($(GO) list "$$pkg"); bin=$$bins/$$(echo "$$path" | tr ./ __).test; \
		[ -x "$$bin" ] || $(GO) test -c -fuzz "^$$name\$$" -o "$$bin" "$$pkg"; \
		echo "fuzzing $$name for $(FUZZTIME)"; \
		(cd "$$pkg" && "$$bin" -test.run '^$$' -test.fuzz "^$$name\$$" -test.fuzztime $(FUZZTIME) \
			-test.fuzzcachedir "$$cache/$$path"); \
	done

## bench: load benchmarks of the proxy against plain Caddy and the
## upstream alone, and the hot paths' micro-benchmarks (redis-server for
## the Redis ones), on loopback, then what each feature costs (a ladder
## of module targets under small chats) and the scenarios of a saturated
## upstream (the queue's shares, upstream_limits, a pool of server keys
## with one revoked), one caller's burst on a fleet and the capacity
## model of the Redis store; writes BENCHMARKS.md (about 25 minutes).
## BASELINE=path/to/caddy measures another build of the module (an
## earlier commit's) beside this one, in the same rounds.
BASELINE ?=
bench: build test-deps
	$(GO) run ./bench -caddy ./caddy -go $(GO) -out BENCHMARKS.md $(if $(BASELINE),-baseline $(BASELINE))

## soak: the proxy under 60 s of mixed load (small chats at half its
## measured maximum and 100 streams at once): no unexpected errors, RSS
## growth under 10% from second 10 to 60, goroutines and open files back
## to the baseline; writes its section of BENCHMARKS.md (about 1.5 minutes).
soak: build
	$(GO) run ./bench -caddy ./caddy -soak -soak-duration 60s -out BENCHMARKS.md

## bench-scarce: only the scenarios of a saturated upstream; rewrites
## their section of BENCHMARKS.md (about 2 minutes).
bench-scarce: build test-deps
	$(GO) run ./bench -caddy ./caddy -scarce-only -out BENCHMARKS.md

## bench-features: only what each feature costs; rewrites its section
## of BENCHMARKS.md (about 4 minutes).
bench-features: build test-deps
	$(GO) run ./bench -caddy ./caddy -features-only -out BENCHMARKS.md

## bench-burst: only one caller's burst on a fleet (200 requests at once
## to two instances sharing Redis, beside other callers' steady load);
## rewrites its section of BENCHMARKS.md (about 30 seconds).
bench-burst: build test-deps
	$(GO) run ./bench -caddy ./caddy -burst-only -out BENCHMARKS.md

## bench-capacity: only the capacity model of the Redis store (Redis'
## commands, bytes and CPU per request, memory per caller in Redis and in
## an instance); rewrites its section of BENCHMARKS.md (about 70 seconds).
bench-capacity: build test-deps
	$(GO) run ./bench -caddy ./caddy -capacity-only -out BENCHMARKS.md

## build: ./caddy with this module, built by xcaddy from xcaddy.json.
build: caddy

caddy: xcaddy.json go.mod go.sum $(GO_SOURCES) | deps
	@[ -x caddy ] || echo "Building ./caddy with this module (xcaddy): the first build takes a few minutes."
	$(GO) run ./internal/cmd/build -config xcaddy.json -o caddy

## deps: Go modules (Debian packages join here as features need them).
deps:
	@command -v $(GO) >/dev/null || { echo "Go 1.26 is required: https://go.dev/dl/" >&2; exit 1; }
	$(GO) mod download

## test-deps: what the tests start for real: redis-server and, for the
## browser test, chromium (Debian packages).
test-deps: deps
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (Debian package)"; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq redis-server >/dev/null; \
	}
	@[ -x /usr/bin/chromium ] || { \
		echo "installing chromium (Debian package)"; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; \
	}

clean:
	rm -f caddy
