# Quick start (Debian 12, as root): `make demo`, then `make test`. Each installs what it needs.
PYTHON := .venv/bin/python
MODE ?= p2p
# 1: the demo runs the test API server and the cluster CA (agents hold no root key); 0: a registry
# file and the local CA on each node (the weaker trust model)
CLUSTER ?= 1

.PHONY: deps demo test unit e2e fuzz bench image image-test

deps:
	./scripts/install-deps.sh $(PKGS)

demo: deps
	$(PYTHON) -m tests.demo --mode $(MODE) $(if $(filter 1,$(CLUSTER)),--control-plane)

# tcpdump: the e2e tests look at the bytes on the wire between nodes; prometheus: promtool and a
# real server scraping an agent; tmux: a terminal for `ameshctl top`; iperf3, stunnel4, haproxy,
# linux-perf: tests/e2e/test_bench.py runs the benchmarks' quick mode
test e2e: PKGS = tcpdump prometheus tmux iperf3 stunnel4 haproxy linux-perf

# kubectl reads the test Kubernetes API server in the tests (Debian's kubernetes-client if absent)
test: deps
	command -v kubectl >/dev/null || ./scripts/install-deps.sh kubernetes-client
	$(PYTHON) -m pytest -q -rfEs

unit: deps
	$(PYTHON) -m pytest -q tests/unit

e2e: deps
	$(PYTHON) -m pytest -q -rs tests/e2e

# tests/fuzz with many more examples (`make test` runs a bounded pass of them)
fuzz: deps
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -q -m fuzz

# iperf3 drives the throughput figures; stunnel4 and haproxy are the mTLS proxies amesh is compared
# with (installed as tools: no service starts); matplotlib (the "bench" extra) draws the chart.
# bench.run (amesh vs direct/stunnel/haproxy), then bench.telemetry_cost, bench.policy_cost,
# bench.traffic_cost, bench.failover, bench.registry (10,000 pods and 2,000 Services from the
# test API server, one agent's registry) and bench.workers (1 against 2 ztunnel workers; linux-perf
# counts the system calls of amesh and stunnel).
# QUICK=1: one short repeat of each, to check the harness.
bench: PKGS = iperf3 stunnel4 haproxy linux-perf
bench: deps
	$(PYTHON) -m bench.run $(if $(QUICK),--quick)
	$(PYTHON) -m bench.telemetry_cost $(if $(QUICK),--quick)
	$(PYTHON) -m bench.policy_cost $(if $(QUICK),--quick)
	$(PYTHON) -m bench.traffic_cost $(if $(QUICK),--quick)
	$(PYTHON) -m bench.failover $(if $(QUICK),--quick)
	$(PYTHON) -m bench.registry $(if $(QUICK),--pods 1000 --services 200 --events 99)
	$(PYTHON) -m bench.workers $(if $(QUICK),--quick)

# The OCI image build/amesh-<version>.oci.tar (Containerfile), without a Docker daemon: buildah over
# a Debian 12 tree from debootstrap (cached in build/image/). image-test builds it and runs the agents
# from it on a test bed (tests/e2e/test_image.py, which `make test` runs too once the image exists).
image:
	./image/build.sh

image-test: image
	$(PYTHON) -m pytest -q -rs tests/e2e/test_image.py
