# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean fuzz

$(STAMP): pyproject.toml scripts/install.sh
	PY=$(PY) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m swapformer.demo

test: $(STAMP)
	$(BIN)/ruff check swapformer tests benchmarks examples
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Grammar fuzzing of detection through the exact target at two lengths; fails on any silent mismatch.
N ?= 10000
fuzz: $(STAMP)
	$(BIN)/python benchmarks/fuzz_detect.py -n $(N)

lint: $(STAMP)
	$(BIN)/ruff check swapformer tests benchmarks examples

clean:
	rm -rf $(VENV) demo_out .pytest_cache
