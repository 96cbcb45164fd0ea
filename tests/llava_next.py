"""A tiny random-weight LLaVA-1.6 (AnyRes) checkpoint and non-square, real-format inputs.

Shared by the unit tests of each role and the CLI tests: the images have different aspect
ratios, so the processor picks different tile grids and each row has its own number of
image tokens (base tile + unpadded grid + newline tokens).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

# (width, height): wide, tall, square, very wide -> different grids and token counts
SIZES = [(300, 200), (180, 320), (256, 256), (400, 120)]


def save_tiny_llava_next(directory: Path, seed: int = 0) -> str:
    """save_pretrained of a random LlavaNext model + processor; the directory path."""
    from mmalign.models.tiny_llava_next import build_tiny_llava_next

    if not (directory / "config.json").exists():
        model, processor = build_tiny_llava_next("small", seed=seed)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return str(directory)


def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    """A noisy RGB JPEG of `size` (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def llava_json(directory: Path, n: int) -> str:
    """LLaVA-instruct JSON of n ShapesWorld conversations with JPEG images resized to the
    non-square SIZES in turn, image paths relative to the JSON file."""
    from PIL import Image

    from mmalign.shapes.records import shapes_rows

    (directory / "img").mkdir(parents=True, exist_ok=True)
    items = []
    for i, row in enumerate(shapes_rows("pref", max_rows=n)):
        image = Image.open(io.BytesIO(row["image"])).convert("RGB").resize(SIZES[i % len(SIZES)])
        name = f"img/{row['id']}.jpg"
        image.save(directory / name, "JPEG")
        items.append({"id": row["id"], "image": name, "conversations": row["conversations"]})
    uri = directory / "data.json"
    uri.write_text(json.dumps(items))
    return str(uri)
