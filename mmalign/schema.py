"""The record contracts between stages as Arrow schemas, written once, and their builders.

Their row types (`PromptRow`, `PreferenceRow`, `LearnerRow`) and what an image value holds
at each stage are in `mmalign.rows`.

1. **Prompt record** — what samplers consume: one image-grounded prompt with an optional
   reference answer (the SFT ground truth BDHS is guided by) and object annotations.
2. **Preference row** — what generators emit and learners consume. TRL-compatible:
   `prompt`, `chosen`, `rejected` are conversational message lists and `images` is a list
   of `{bytes, path}` structs, exactly the layout `datasets` uses for an `Image` list, so a
   TRL user loads our Parquet with `datasets.load_dataset("parquet", ...)` and trains on it
   unchanged. Our extensions are extra columns TRL ignores:
   `rejected_extra` (more rejected answers, e.g. the dataset's and the BDHS one for the
   two-rejected loss), `responses` (K answers ranked best first, for MDPO),
   `rejected_images` (the image the rejected answer goes with, when it differs, e.g. a
   distorted image), `source`, `method` and a `meta` struct.

Images travel as bytes or URIs, never decoded pixels: decoding happens in the actor that
needs pixels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from mmalign.rows import ContentPart, ImageStruct, Message, PreferenceRow, PromptRow

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
IMAGES = pa.list_(IMAGE)
CONTENT = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(CONTENT))]))

META = pa.struct(
    [
        ("model_id", pa.string()),  # checkpoint that produced the rejected/ranked answers
        ("model_revision", pa.string()),  # its revision / weight version tag
        ("seed", pa.int64()),
        ("similarity", pa.float64()),  # BDHS: cosine(embed(y-), embed(y+)) of the accepted y-
        ("iterations", pa.int64()),  # BDHS: tries used
        ("weight_version", pa.int64()),  # online: policy version that sampled the pair
        ("params", pa.string()),  # JSON of method parameters (rho_th, eps_s, cut points...)
    ]
)

PREFERENCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("images", IMAGES),
        ("rejected_images", IMAGES),
        ("rejected_extra", pa.list_(pa.string())),
        ("responses", pa.list_(pa.string())),
        ("source", pa.string()),
        ("method", pa.string()),
        ("meta", META),
    ]
)

PROMPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),  # user text without the image placeholder
        ("images", IMAGES),
        ("reference", pa.string()),  # reference (chosen) answer; "" when unknown
        ("rejected", pa.string()),  # an existing rejected answer; "" when none
        ("objects", pa.list_(pa.string())),  # annotated object classes; [] when unknown
        ("source", pa.string()),
    ]
)

IMAGE_PLACEHOLDER = "<image>"


class RowError(ValueError):
    """A row violates a contract; the message names the column (used for quarantine)."""


def image_ref(image: bytes | str | dict[str, Any]) -> ImageStruct:
    """bytes -> {bytes, path=None}; 'path/or/s3://uri' -> {bytes=None, path}."""
    if isinstance(image, dict):
        return {"bytes": image.get("bytes"), "path": image.get("path")}
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    if isinstance(image, str) and image:
        return {"bytes": None, "path": image}
    raise RowError(f"images: expected bytes or a path, got {type(image).__name__}")


def user_message(text: str, n_images: int = 1) -> list[Message]:
    """TRL conversational prompt: image placeholders first, then the text."""
    content: list[ContentPart] = [{"type": "image", "text": None} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def assistant_message(text: str) -> list[Message]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def message_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Concatenated text parts of a message list (image placeholders dropped)."""
    parts = []
    for msg in messages or ():
        for item in msg.get("content") or ():
            if item.get("type") == "text" and item.get("text"):
                parts.append(item["text"])
    return "\n".join(parts)


def make_meta(**fields: Any) -> dict[str, Any]:
    """A META struct; unknown keys go into the JSON `params` field."""
    names = [f.name for f in META]
    meta: dict[str, Any] = {n: None for n in names}
    params = dict(fields.pop("params", None) or {})
    for key, value in fields.items():
        if key in names:
            meta[key] = value
        else:
            params[key] = value
    meta["params"] = json.dumps(params, sort_keys=True, default=str) if params else None
    return meta


def preference_row(
    *,
    id: str,  # noqa: A002 - the column's name
    prompt: str,
    chosen: str,
    rejected: str,
    images: Sequence[bytes | str | dict[str, Any]],
    source: str,
    method: str,
    rejected_extra: Sequence[str] = (),
    responses: Sequence[str] = (),
    rejected_images: Sequence[bytes | str | dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
) -> PreferenceRow:
    """Build one validated preference row from plain strings."""
    row: PreferenceRow = {
        "id": str(id),
        "prompt": user_message(prompt, n_images=len(images)),
        "chosen": assistant_message(chosen),
        "rejected": assistant_message(rejected),
        "images": [image_ref(i) for i in images],
        "rejected_images": None
        if rejected_images is None
        else [image_ref(i) for i in rejected_images],
        "rejected_extra": list(rejected_extra),
        "responses": list(responses),
        "source": source,
        "method": method,
        "meta": make_meta(**(meta or {})),
    }
    validate_preference_row(row)
    return row


def validate_preference_row(row: Mapping[str, Any]) -> None:
    """Raise RowError naming the first bad column."""
    for col in ("id", "source", "method"):
        if not isinstance(row.get(col), str) or not row[col]:
            raise RowError(f"{col}: must be a non-empty string")
    if not message_text(row.get("prompt") or []).strip():
        raise RowError("prompt: empty text")
    if not message_text(row.get("chosen") or []).strip():
        raise RowError("chosen: empty response")
    if not message_text(row.get("rejected") or []).strip() and not row.get("responses"):
        raise RowError("rejected: empty response")
    images = row.get("images")
    if not images:
        raise RowError("images: at least one image is required")
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not (img.get("bytes") or img.get("path")):
            raise RowError(f"images[{i}]: needs bytes or a path")
    if row.get("responses") and len(row["responses"]) < 2:
        raise RowError("responses: a ranking needs at least 2 responses")


def prompt_record(
    *,
    id: str,  # noqa: A002
    prompt: str,
    images: Sequence[bytes | str | dict[str, Any]],
    reference: str = "",
    rejected: str = "",
    objects: Sequence[str] = (),
    source: str = "",
) -> PromptRow:
    """Build one validated prompt record (PROMPT_SCHEMA)."""
    text = prompt.replace(IMAGE_PLACEHOLDER, "").strip()
    rec: PromptRow = {
        "id": str(id),
        "prompt": text,
        "images": [image_ref(i) for i in images],
        "reference": reference or "",
        "rejected": rejected or "",
        "objects": [str(o) for o in objects],
        "source": source,
    }
    if not rec["id"]:
        raise RowError("id: must be a non-empty string")
    if not text:
        raise RowError("prompt: empty text")
    if not rec["images"]:
        raise RowError("images: at least one image is required")
    return rec


# ------------------------------------------------------------------ Parquet metadata


def _hf_feature(typ: pa.DataType, image: bool = False) -> dict[str, Any]:
    """The `datasets` feature JSON for an arrow type (so images decode to PIL on load)."""
    if image:
        return {"_type": "Image"}
    if pa.types.is_list(typ):
        inner = typ.value_type
        return {"feature": _hf_feature(inner, image=inner == IMAGE), "_type": "List"}
    if pa.types.is_struct(typ):
        return {typ.field(i).name: _hf_feature(typ.field(i).type) for i in range(typ.num_fields)}
    return {"dtype": str(typ).replace("double", "float64"), "_type": "Value"}


def with_hf_metadata(schema: pa.Schema) -> pa.Schema:
    """Attach the `huggingface` schema metadata `datasets` reads to restore features."""
    features = {f.name: _hf_feature(f.type) for f in schema}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return schema.with_metadata({**(schema.metadata or {}), **meta})
