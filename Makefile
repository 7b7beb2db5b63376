# The two commands of the README. Each creates .venv when missing, installs, then runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robustkit-installed

.PHONY: quickstart test lint install bench bench-quick bench-gpu clean

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

# Every benchmark module (benchmarks/__init__.py: MODULES), JSON in benchmarks/results/.
# ARGS go to each module, so use the shared flags there (e.g. ARGS="--threads 1").
BENCH := attacks bo_attack certify corruptions defense_table defenses fast_vs_autoattack ibp lipschitz sharding training
# The ones that take --device (bo_attack is CPU only); GPU results go to benchmarks/results/gpu/.
BENCH_GPU := attacks certify corruptions defense_table defenses fast_vs_autoattack ibp lipschitz sharding training

bench: $(STAMP)
	set -e; for m in $(BENCH); do $(BIN)/python -m benchmarks.$$m $(ARGS); done

bench-quick: $(STAMP)
	set -e; for m in $(BENCH); do $(BIN)/python -m benchmarks.$$m --quick $(ARGS); done

bench-gpu: $(STAMP)
	set -e; for m in $(BENCH_GPU); do \
	  $(BIN)/python -m benchmarks.$$m --device cuda --out benchmarks/results/gpu/$$m.json $(ARGS); done
	$(BIN)/python -m benchmarks.attacks --device cuda --amp --channels-last \
	  --out benchmarks/results/gpu/attacks_amp_channels_last.json $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
