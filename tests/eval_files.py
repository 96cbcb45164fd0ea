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
