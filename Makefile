# Everything a fresh machine (Python 3.11, root) needs is installed by these targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/pypi.toml
HOST   ?= 127.0.0.1
PORT   ?= 8080
APT_PACKAGES ?= redis-server nginx chromium curl
# `make bench` also needs wrk; `make test` does not
BENCH_APT_PACKAGES ?= redis-server wrk

.PHONY: run test lint bench docs setup run-setup system-deps clean chaos

# `make run` needs the package alone; the test, lint and docs targets add the dev extras
# (which include the docs' and locust's packages). Each stamp is newer than pyproject.toml
# once its install is done; the dev install also satisfies `make run`.
$(VENV)/.run-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(VENV)/.run-installed $@

run-setup: $(VENV)/.run-installed

setup: $(VENV)/.dev-installed

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

run: run-setup
	$(BIN)/ratekeeper serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: setup system-deps
	$(BIN)/pytest
	@$(MAKE) --no-print-directory docs

# The documentation site, built into build/site; a broken link or a missing page fails it.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# ruff, mypy strict, and the import contract of the layers (pyproject.toml's importlinter)
lint: setup
	$(BIN)/ruff check ratekeeper tests loadtest
	$(BIN)/mypy
	$(BIN)/lint-imports

# Every benchmark figure in one run (under 3 minutes): a table on stdout,
# loadtest/results/bench.json. Figures, never a pass/fail.
bench: setup
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(BENCH_APT_PACKAGES)"
	$(BIN)/python loadtest/bench.py $(BENCH_ARGS)

# This checkout against AGAINST (default: the code before the check path's rework), served
# from a temporary worktree, in alternating rounds (about 3 minutes): a table on stdout,
# loadtest/results/ab.json. Figures, never a pass/fail.
AGAINST ?= d6abc48
.PHONY: bench-ab
bench-ab: setup
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(BENCH_APT_PACKAGES)"
	$(BIN)/python loadtest/ab.py --against $(AGAINST) $(AB_ARGS)

# Faults under steady load against a real 2-worker server, one after another (a few
# minutes): one table on stdout. Figures, never a pass/fail.
chaos: setup
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="redis-server"
	$(BIN)/python loadtest/chaos.py $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
