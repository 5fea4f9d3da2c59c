# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install bench clean

$(BIN)/runbook: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/runbook

# Install, then run a harmless shipped playbook against the local machine (no SSH needed).
demo: install
	$(BIN)/runbook validate playbooks/health-check.yml
	$(BIN)/runbook run playbooks/health-check.yml

# Install everything, then run the whole test suite (real sshd hosts on loopback).
test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .runbook
