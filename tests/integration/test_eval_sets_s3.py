"""pope-coco inputs on S3 (a real moto server with IAM auth): the POPE files, COCO
annotations and synonyms are read by the driver, the images by the Ray Data row function
(`pipelines.evaluate.ReadImage`, called here as a worker calls it), all through
mmalign.storage; a missing image becomes a read error naming the URI."""

from __future__ import annotations

from pathlib import Path

from mmalign import storage
from mmalign.config import load
from pipelines.evaluate import ReadImage, pope_coco_set
from tests.eval_files import SYNONYMS, write_coco, write_pope
from tests.llava_next import jpeg


def test_pope_coco_set_and_images_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "eval"
    write_pope(local / "pope" / "coco_pope_random.json", [("a.jpg", "dog", "yes")])
    write_pope(local / "pope" / "coco_pope_popular.json", [("a.jpg", "cat", "no")])
    write_coco(local / "coco" / "instances_val2014.json", {"a.jpg": ["dog", "person"]})
    (local / "synonyms.txt").write_text(SYNONYMS)
    (local / "val2014").mkdir()
    (local / "val2014" / "a.jpg").write_bytes(jpeg((120, 80)))
    storage.upload_dir(str(local), f"{s3_bucket}/eval")
    base = f"{s3_bucket}/eval"
    cfg = load(
        None,
        {
            "data.eval": "pope-coco",
            "data.pope_files": f"{base}/pope/coco_pope_random.json,"
            f"{base}/pope/coco_pope_popular.json",
            "data.coco_annotations": f"{base}/coco/instances_val2014.json",
            "data.coco_synonyms": f"{base}/synonyms.txt",
            "data.eval_image_root": f"{base}/val2014",
        },
    )
    es = pope_coco_set(cfg)
    assert [(r.split, r.label) for r in es.requests if r.kind == "pope"] == [
        ("random", True),
        ("popular", False),
    ]
    assert {r.image_id for r in es.requests} == {f"{base}/val2014/a.jpg"}
    assert es.truths == {f"{base}/val2014/a.jpg": frozenset({"dog", "person"})}
    assert es.vocab.find_mentions("a woman at a desk") == ["person", "dining table"]

    read = ReadImage()
    row = read({"uri": f"{base}/val2014/a.jpg"})
    assert row["image"] == jpeg((120, 80)) and row["read_error"] == ""
    row = read({"uri": f"{base}/val2014/missing.jpg"})
    assert row["image"] == b"" and f"{base}/val2014/missing.jpg" in row["read_error"]
