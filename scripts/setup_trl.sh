#!/usr/bin/env bash
# Create .venv-trl: a separate env with TRL for bench/bench_trl_overhead.py (TRL's
# DPOTrainer on the same pairs and model as pipelines/offline_dpo.py).
#   bash scripts/setup_trl.sh
#   .venv/bin/python bench/bench_trl_overhead.py
# Separate from .venv because trl brings its own pins; torch goes first and pinned at the
# CPU build the main env uses (otherwise pip pulls a multi-GB CUDA build), and the script
# fails if pip moved it. mmalign goes in without deps, for its tiny-model helpers only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${MMALIGN_TORCH:-torch==2.13.0}
[ -x .venv-trl/bin/python ] || "$PY" -m venv .venv-trl
.venv-trl/bin/python -m pip install -q --upgrade pip
.venv-trl/bin/python -m pip install -q "$TORCH"
.venv-trl/bin/python -m pip install -q "${MMALIGN_TRL:-trl==1.16.0}" peft pillow pyarrow "$TORCH"
.venv-trl/bin/python -m pip install -q --no-deps -e .
.venv-trl/bin/python - <<'PY'
import peft, torch, transformers, trl
assert torch.__version__.startswith("2.13.0"), f"pip moved torch to {torch.__version__}"
print("torch", torch.__version__, "transformers", transformers.__version__,
      "trl", trl.__version__, "peft", peft.__version__)
PY
