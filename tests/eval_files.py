"""Tiny POPE / COCO-format evaluation files, shared by the unit and CLI tests.

The official formats: POPE question files are JSON Lines ({question_id, image, text,
label}); a COCO instances file has images / annotations / categories; a CHAIR synonyms
file has one class per line, the class name first. The classes include COCO ones that
ShapesWorld lacks (pizza, dining table, dog), so a ShapesWorld vocabulary cannot score them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CATEGORIES = ["person", "bicycle", "dog", "cat", "pizza", "dining table"]
SYNONYMS = "person, man, woman, people\ndining table, table, desk\nbicycle, bike\n"


def write_pope(path: Path, questions: Sequence[tuple[str, str, str]]) -> str:
    """One POPE JSONL file of (image, object, "yes"/"no") questions; its path."""
    lines = [
        {"question_id": i + 1, "image": image, "text": f"Is there a {obj} in the image?",
         "label": label}
        for i, (image, obj, label) in enumerate(questions)
    ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def write_coco(
    path: Path, images: Mapping[str, Sequence[str]], categories: Sequence[str] = CATEGORIES
) -> str:
    """A COCO instances JSON: file name -> annotated categories (one box each); its path."""
    cats = [{"id": 10 + i, "name": name, "supercategory": "x"} for i, name in enumerate(categories)]
    ids = {c["name"]: c["id"] for c in cats}
    data: dict[str, Any] = {"images": [], "annotations": [], "categories": cats}
    for i, (name, objects) in enumerate(images.items()):
        data["images"].append({"id": 100 + i, "file_name": name, "width": 300, "height": 200})
        for obj in objects:
            data["annotations"].append(
                {"id": len(data["annotations"]) + 1, "image_id": 100 + i,
                 "category_id": ids[obj], "bbox": [0, 0, 10, 10]}
            )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


# ShapesWorld shape -> a COCO category (none is a ShapesWorld class)
AS_COCO = {"circle": "frisbee", "square": "tv", "triangle": "kite", "cross": "airplane"}
SHAPE_SYNONYMS = (
    "frisbee, circle, disc, ball\ntv, square, box, block\nkite, triangle, wedge\n"
    "airplane, cross, plus\n"
)
N_IMAGES = 4


def build_files(root: Path) -> dict[str, str]:
    """Three POPE split files, a COCO instances JSON and a synonyms file over N_IMAGES
    non-square ShapesWorld JPEGs under <root>/val2014 (COCO class names via AS_COCO), plus
    one POPE question on a missing image; {split or "coco" or "synonyms": path}."""
    import io

    from PIL import Image

    from mmalign.shapes.records import shapes_rows
    from tests.llava_next import SIZES

    (root / "val2014").mkdir(parents=True)
    truths: dict[str, list[str]] = {}
    for i, row in enumerate(shapes_rows("eval", max_rows=N_IMAGES)):
        image = Image.open(io.BytesIO(row["image"])).convert("RGB").resize(SIZES[i % len(SIZES)])
        name = f"COCO_val2014_{i:012d}.jpg"
        image.save(root / "val2014" / name, "JPEG")
        truths[name] = sorted({AS_COCO[o["shape"]] for o in row["objects"]})
    files = {}
    for k, split in enumerate(("adversarial", "popular", "random")):
        questions = []
        for name, present in truths.items():
            absent = [c for c in AS_COCO.values() if c not in present]
            questions += [(name, present[0], "yes"), (name, absent[k % len(absent)], "no")]
        if split == "random":
            questions.append(("COCO_val2014_missing.jpg", "kite", "no"))
        files[split] = write_pope(root / "pope" / f"coco_pope_{split}.json", questions)
    files["coco"] = write_coco(
        root / "annotations" / "instances_val2014.json", truths, list(AS_COCO.values())
    )
    (root / "synonyms.txt").write_text(SHAPE_SYNONYMS)
    files["synonyms"] = str(root / "synonyms.txt")
    return files
