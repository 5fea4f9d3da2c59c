# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint install bench clean

$(BIN)/runbook: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(BIN)/runbook

# Install, then run a harmless shipped playbook against the local machine (no SSH needed).
# -v shows what each step measured (its output) and what each check concluded (its message).
demo: install
	$(BIN)/runbook validate playbooks/health-check.yml
	@# Exit 2 means a check found a breach on this machine: the playbook worked, the demo succeeded.
	@$(BIN)/runbook run playbooks/health-check.yml -v; rc=$$?; \
	if [ $$rc -eq 2 ]; then echo "health-check: a threshold was breached on this machine (exit 2; see the failed check above)"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi

# Install everything, check the code (ruff, mypy), then run the whole test suite (real sshd hosts on loopback).
test: install lint
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check runbook tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .runbook
