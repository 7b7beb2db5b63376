# The two commands of the README. Each creates .venv when missing, installs, then runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robustkit-installed

.PHONY: quickstart test lint install bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test,bench]'
	$(BIN)/pip install --no-deps 'torchattacks>=3.5'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/robustkit quickstart --out runs/quickstart $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest exit code 5 means "no tests collected": that must fail, not pass silently.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/attacks.py
	$(BIN)/python benchmarks/certify.py
	$(BIN)/python benchmarks/defenses.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
