# The two commands a new user needs: `make run` and `make test`. Each sets itself up.
.PHONY: run test test-fast lint bench bench-smoke bench-sip setup clean cluster screenshot

PY := .venv/bin/python
PYTEST_ARGS ?=

run:
	@scripts/setup.sh run
	GATEWAY_DEV=true GATEWAY_DEMO=true $(PY) -m gateway serve

test: lint
	@scripts/setup.sh test
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Several instances on this machine, no Docker (README "Running several instances"): Redis,
# 2 gateways (8080, 8081; the first with the demo) and Kamailio, the cluster's SIP address (5060).
cluster:
	@scripts/setup.sh cluster
	$(PY) -m devtools.cluster $(CLUSTER_ARGS)

# ruff (lint + format check, one line length) and mypy (strict on the domain, errors and policy).
lint:
	@scripts/setup.sh run
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Unit and API tests only (no SIP, browser or Keycloak peers): quick feedback while coding.
test-fast: lint
	$(PY) -m pytest -q -m "not sip and not browser and not keycloak and not slow" $(PYTEST_ARGS)

# The README's picture of the console, taken by the browser test that drives it with the keyboard.
screenshot:
	@scripts/setup.sh test
	GATEWAY_CONSOLE_SCREENSHOT=docs/console.png $(PY) -m pytest -q tests/test_browser_console.py -k keyboard

# Benchmarks print tables (bench/README.md). The SIP bench's sweep: make bench-sip VOICE_SIP_ARGS="--workloads a,c --sizes 64,128,256"
VOICE_SIP_ARGS ?=

bench:
	@scripts/setup.sh bench
	$(PY) bench/chat.py
	$(PY) bench/state.py
	$(PY) bench/voice_sip.py $(VOICE_SIP_ARGS)
	$(PY) bench/voice_webrtc.py
	$(PY) bench/fork.py

bench-sip:
	@scripts/setup.sh bench
	$(PY) bench/voice_sip.py $(VOICE_SIP_ARGS)

bench-smoke:
	@scripts/setup.sh bench
	$(PY) bench/chat.py --smoke
	$(PY) bench/state.py --smoke
	$(PY) bench/voice_sip.py --smoke
	$(PY) bench/voice_webrtc.py --smoke
	$(PY) bench/fork.py --smoke

clean:
	rm -rf var .pytest_cache
