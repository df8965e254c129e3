# Everything a fresh machine (Python 3.11, root) needs is installed by these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/pypi.toml
APT_PACKAGES ?= redis-server nginx chromium
# `make bench` also needs wrk; `make test` does not
BENCH_APT_PACKAGES ?= redis-server wrk

.PHONY: run test lint bench setup system-deps clean

$(BIN)/ratekeeper: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

setup: $(BIN)/ratekeeper

# Installs Debian packages only when one of their commands is missing.
system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
	  case $$pkg in redis-server) cmd=redis-server;; nginx) cmd=nginx;; chromium) cmd=chromium;; wrk) cmd=wrk;; *) cmd=$$pkg;; esac; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: setup
	$(BIN)/ratekeeper serve --config $(CONFIG) --host 127.0.0.1 --port 8080

test: setup system-deps
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check ratekeeper tests loadtest
	$(BIN)/mypy

# Every issue-4 figure in one run (under 3 minutes): a table on stdout,
# loadtest/results/bench.json. Figures, never a pass/fail.
bench: setup
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(BENCH_APT_PACKAGES)"
	$(BIN)/python loadtest/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
