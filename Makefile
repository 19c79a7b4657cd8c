# ferry — build, test and benchmark targets. Run as root (ptrace, clone3 set_tid).
GO      ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
export CGO_ENABLED := 0

.PHONY: all build deps test test-unit bench proto lint demo e2e fuzz clean

all: build

## deps: install what builds and tests need (Debian packages, Go modules)
deps:
	@bash scripts/deps.sh

## build: bin/ferry and bin/migrate (static, no cgo)
build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ferry ./cmd/ferry
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/migrate ./cmd/migrate

## test: lint, unit tests, the core dump/restore tests and the e2e migration tests (as root)
test: deps build lint
	$(GO) test -count=1 -timeout 25m ./...

## e2e: the multi-host migration tests alone, verbose (make test runs them too)
e2e: deps build
	$(GO) test -count=1 -v -timeout 20m ./e2e

## bench: dump/restore benchmarks; JSON results in bench/results.json
bench: deps build
	@bash scripts/bench.sh

## proto: regenerate images/pb and agent/api/v1 from their .proto files (needs protoc-gen-go and protoc-gen-go-grpc)
proto:
	protoc --go_out=. --go_opt=module=github.com/ferrycr/ferry images/*.proto
	protoc --go_out=. --go_opt=module=github.com/ferrycr/ferry --go-grpc_out=. --go-grpc_opt=module=github.com/ferrycr/ferry agent/api/v1/*.proto

## lint: formatting, vet, and the project's own rules
lint:
	@bash scripts/lint.sh

## demo: two local hosts (network namespaces); a workload moved from one to the other
demo: deps build
	@bash scripts/demo.sh

## fuzz: run every fuzz target for a while
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzReader -fuzztime 60s ./images/

clean:
	rm -rf bin
