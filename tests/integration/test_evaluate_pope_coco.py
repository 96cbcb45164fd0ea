"""pipelines/evaluate.py on POPE / COCO-format files (data.eval pope-coco) on local Ray.

Real inputs in the official formats, built here: three POPE JSONL split files, a COCO
instances JSON and a CHAIR synonyms file, and non-square JPEGs under an image root. The
classes are COCO's, none of them ShapesWorld's; the synonyms name them by the shape words
the shipped tiny policy says ("circle" is a frisbee), so its captions mention COCO classes
and CHAIR counts them. The same files then go through a tiny random LLaVA-1.6 (AnyRes),
whose tile grid differs per aspect ratio. One POPE question names a missing image: it is
quarantined with its reason and left out of the scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.eval_files import AS_COCO, N_IMAGES, build_files
from tests.eval_files import SHAPE_SYNONYMS as SYNONYMS
from tests.llava_next import save_tiny_llava_next

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_evaluate_cli_on_pope_and_coco_files(tmp_path: Path) -> None:
    import ray

    from actors.runtime import init_ray
    from mmalign.eval_sets import coco_vocabulary
    from mmalign.metrics.chair import compute_chair
    from pipelines import evaluate

    files = build_files(tmp_path / "data")
    args = [
        "--data.eval", "pope-coco",
        "--data.pope_files", ",".join(files[s] for s in ("adversarial", "popular", "random")),
        "--data.coco_annotations", files["coco"],
        "--data.coco_synonyms", files["synonyms"],
        "--data.eval_image_root", str(tmp_path / "data" / "val2014"),
    ]  # fmt: skip
    coco = json.loads(Path(files["coco"]).read_text())
    n_truth = sum(
        len({a["category_id"] for a in coco["annotations"] if a["image_id"] == img["id"]})
        for img in coco["images"]
    )
    vocab = coco_vocabulary(list(AS_COCO.values()), SYNONYMS)
    init_ray(local_cpus=8)
    try:
        runs = {
            "shapes-llava-small": ["--sampler.max_new_tokens", "24"],
            "llava-next": [
                "--sampler.model", save_tiny_llava_next(tmp_path / "tiny-next"),
                "--sampler.max_new_tokens", "6",
            ],
        }  # fmt: skip
        for label, extra in runs.items():
            out = tmp_path / label
            report = evaluate.main([*args, *extra, "--storage.output_dir", str(out)])
            assert json.loads((out / "eval" / "report.json").read_text()) == report
            # the three splits of the files, each 2 questions per image (the missing image's
            # question quarantined, not scored)
            assert list(report["pope"]) == ["adversarial", "popular", "random"], label
            assert {s["n"] for s in report["pope"].values()} == {2 * N_IMAGES}, label
            assert all(s["tp"] + s["fn"] == N_IMAGES for s in report["pope"].values())
            assert report["n_quarantined"] == 1
            (bad,) = [json.loads(x) for x in (out / "eval" / "quarantine.jsonl").open()]
            assert bad["id"].endswith("COCO_val2014_missing.jpg") and "Error" in bad["reason"]
            # CHAIR over the COCO vocabulary: every COCO image described, its categories
            # the ground truth; the figures follow from the written captions
            chair = report["chair"]
            assert report["n_classes"] == 4 and chair["n_descriptions"] == N_IMAGES
            assert chair["n_ground_truth_objects"] == n_truth
            rows = [json.loads(x) for x in (out / "eval" / "responses.jsonl").open()]
            described = [r for r in rows if r["kind"] == "describe"]
            truths = {
                str(tmp_path / "data" / "val2014" / img["file_name"]): {
                    c["name"]
                    for a in coco["annotations"]
                    if a["image_id"] == img["id"]
                    for c in coco["categories"]
                    if c["id"] == a["category_id"]
                }
                for img in coco["images"]
            }
            again = compute_chair([(r["response"], truths[r["image"]]) for r in described], vocab)
            assert (again.chair_i, again.chair_s, again.recall) == (
                chair["chair_i"],
                chair["chair_s"],
                chair["recall"],
            )
            if label == "shapes-llava-small":
                # it describes shapes, which the synonyms make COCO classes: counted
                assert chair["n_mentions"] > 0 and chair["n_recalled_objects"] > 0, described
    finally:
        ray.shutdown()
