# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The oldest transformers the hf extra admits, installed beside the venv's own (its hub major differs).
TF_OLDEST := 5.17.0
TF_OLDEST_DIR := $(VENV)/tf-oldest
HF_TESTS := tests/test_hf_generate.py tests/test_hf_models.py tests/test_targets_rewrite.py

.PHONY: demo demo-hf-oldest test test-slow test-hf-oldest lint bench clean fuzz

$(STAMP): pyproject.toml scripts/install.sh
	PY=$(PY) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m swapformer.demo

test: $(STAMP)
	$(BIN)/ruff check swapformer tests benchmarks examples
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) test-hf-oldest

$(TF_OLDEST_DIR)/.installed: $(STAMP)
	$(BIN)/python -m pip install -q --target $(TF_OLDEST_DIR) "huggingface_hub>=1.5,<2"
	$(BIN)/python -m pip install -q --target $(TF_OLDEST_DIR) --no-deps "transformers==$(TF_OLDEST)"
	touch $@

test-hf-oldest: $(TF_OLDEST_DIR)/.installed
	PYTHONPATH=$(TF_OLDEST_DIR) $(BIN)/python -c "import transformers as t; assert t.__version__ == '$(TF_OLDEST)', t.__version__"
	PYTHONPATH=$(TF_OLDEST_DIR) $(BIN)/python -m pytest -q -p no:cacheprovider $(HF_TESTS)

# The demo on the oldest supported transformers (the newest is what `make demo` gets from pip).
demo-hf-oldest: $(TF_OLDEST_DIR)/.installed
	PYTHONPATH=$(TF_OLDEST_DIR) $(BIN)/python -m swapformer.demo

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
