# Quick start (Debian 12, as root): `make demo`, then `make test`. Each installs what it needs.
PYTHON := .venv/bin/python
MODE ?= p2p

.PHONY: deps demo test unit e2e

deps:
	./scripts/install-deps.sh $(PKGS)

demo: deps
	$(PYTHON) -m tests.demo --mode $(MODE)

# tcpdump: the e2e tests look at the bytes on the wire between nodes
test e2e: PKGS = tcpdump

test: deps
	$(PYTHON) -m pytest -q -rfEs

unit: deps
	$(PYTHON) -m pytest -q tests/unit

e2e: deps
	$(PYTHON) -m pytest -q -rs tests/e2e
