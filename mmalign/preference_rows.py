"""Preference rows -> the learner's plain rows (pure: no Ray, no file or network access).

Accepted inputs, one row at a time:
- our PREFERENCE_SCHEMA rows (`mmalign.schema`): conversational `prompt`/`chosen`/`rejected`,
  `images` as a list of {bytes, path} structs, optional `rejected_extra`, `responses`,
  `rejected_images`;
- TRL preference rows: `prompt`/`chosen`/`rejected` as plain strings or as message lists
  (content a string or a list of {"type": "text"|"image", ...} parts), `images` (list) or
  `image` (one), including TRL's implicit-prompt layout where `chosen`/`rejected` hold the
  whole conversation and there is no `prompt` column.

Output (LEARNER_COLUMNS, a `mmalign.rows.LearnerRow` with every key set, what
`PreferenceLearner.step` reads): {"id", "image": encoded image
bytes, "prompt", "chosen", "rejected", "rejected_extra": [str] (at most one, two-rejected
loss), "responses": [str] (ranked best first, MDPO; [] otherwise)}. A row that cannot be
trained on raises `RowError` whose message starts with the offending column, so callers can
quarantine it and go on.

Images given only as a path are resolved by the caller's `load_image(struct) -> bytes`
(e.g. `mmalign.io.load_image_bytes`), which keeps this module free of I/O.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import pyarrow as pa

from mmalign.rows import LearnerRow
from mmalign.schema import IMAGE_PLACEHOLDER, RowError

LEARNER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("rejected_extra", pa.list_(pa.string())),
        ("responses", pa.list_(pa.string())),
    ]
)
LEARNER_COLUMNS: tuple[str, ...] = tuple(LEARNER_SCHEMA.names)
# convert_batch adds this column: "" for a good row, else the RowError message.
ERROR_COLUMN: Final = "error"
CONVERTED_SCHEMA = LEARNER_SCHEMA.append(pa.field(ERROR_COLUMN, pa.string()))


class ConvertedRow(LearnerRow):
    """A CONVERTED_SCHEMA row: a learner row (every key set, `image` as bytes) + `error`."""

    error: str


ImageLoader = Callable[[dict[str, Any]], bytes]


def _content_text(content: Any, column: str) -> str:
    """Text of one message's content: a string, or a list of typed parts (images dropped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping):
                if part.get("type", "text") == "text" and part.get("text"):
                    parts.append(str(part["text"]))
            else:
                raise RowError(f"{column}: unexpected content part {type(part).__name__}")
        return "\n".join(parts)
    raise RowError(f"{column}: unexpected message content {type(content).__name__}")


def text_of(value: Any, column: str, role: str | None = None) -> str:
    """Plain text of a string or a message list; with `role`, only that role's messages
    count when any message has it (TRL's implicit-prompt rows carry the user turn too)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(m, Mapping) for m in value):
        raise RowError(f"{column}: expected a string or a list of messages")
    messages = list(value)
    if role is not None and any(m.get("role") == role for m in messages):
        messages = [m for m in messages if m.get("role") == role]
    texts = [_content_text(m.get("content"), column) for m in messages]
    return "\n".join(t for t in texts if t)


def _clean_prompt(text: str) -> str:
    # The learner adds the model's own image token through its chat template.
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def _image_bytes(raw: Mapping[str, Any], load_image: ImageLoader | None) -> bytes:
    """Encoded bytes of the row's single image (`images` list or `image` value)."""
    column = "images" if raw.get("images") is not None else "image"
    value = raw.get(column)
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise RowError(f"{column}: {len(value)} images; the learner takes exactly one per row")
        value = value[0]
    if value is None or value == "":
        raise RowError(f"{column}: missing")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        value = {"bytes": None, "path": value}
        data = b""
    elif isinstance(value, Mapping):
        data = bytes(value.get("bytes") or b"")
    elif hasattr(value, "save"):  # a PIL image (datasets decodes Image features to PIL)
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise RowError(f"{column}: unsupported image value {type(value).__name__}")
    if not data:
        data = _load_path(value, column, load_image)
    try:  # decode once here so an unreadable image is quarantined, not a crashed step
        from PIL import Image

        Image.open(io.BytesIO(data)).load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... by format
        raise RowError(f"{column}: unreadable image ({type(err).__name__})") from None
    return data


def _load_path(value: Any, column: str, load_image: ImageLoader | None) -> bytes:
    path = value.get("path") if isinstance(value, Mapping) else None
    if not path:
        raise RowError(f"{column}: image has neither bytes nor a path")
    if load_image is None:
        raise RowError(f"{column}: image {path!r} is a path and no loader was given")
    try:
        data = load_image({"bytes": None, "path": path})
    except RowError:
        raise
    except (OSError, ValueError) as err:
        raise RowError(f"{column}: cannot read {path!r} ({type(err).__name__}: {err})") from None
    if not data:
        raise RowError(f"{column}: {path!r} is empty")
    return data


def _string_list(value: Any, column: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise RowError(f"{column}: expected a list of strings")
    out = [text_of(v, column, role="assistant").strip() for v in value]
    if any(not t for t in out):
        raise RowError(f"{column}: empty response in the list")
    return out


def row_id(raw: Mapping[str, Any]) -> str:
    """The row's `id`, or a stable hash of its text columns when it has none (TRL data)."""
    rid = raw.get("id")
    if rid is not None and str(rid) != "":
        return str(rid)
    text = repr([raw.get(k) for k in ("prompt", "chosen", "rejected")])
    return "sha1-" + hashlib.sha1(text.encode()).hexdigest()[:16]


def to_learner_row(
    raw: Mapping[str, Any], *, load_image: ImageLoader | None = None, ranked: bool = False
) -> LearnerRow:
    """One preference row (ours or TRL) -> one learner row (LEARNER_COLUMNS).

    Args:
        raw: the input row as Python values (e.g. `pyarrow.Table.to_pylist()` output).
        load_image: reads an image struct {"bytes": None, "path": p} -> bytes; needed only
            for rows whose image is a path. It may raise RowError for unreadable images.
        ranked: the learner runs MDPO: `responses` (K >= 2, best first), or a plain pair
            as the K = 2 ranking [chosen, rejected]; a second rejected answer is an error.

    Raises:
        RowError: the message starts with the offending column's name.
    """
    rejected_images = raw.get("rejected_images")
    if rejected_images:  # a distorted image for y- would be silently ignored otherwise
        raise RowError("rejected_images: a separate image for the rejected answer is unsupported")
    responses = _string_list(raw.get("responses"), "responses")
    if responses and len(responses) < 2:
        raise RowError("responses: a ranking needs at least 2 responses")
    chosen = text_of(raw.get("chosen"), "chosen", role="assistant").strip()
    rejected = text_of(raw.get("rejected"), "rejected", role="assistant").strip()
    if responses:  # a ranking defines its own extremes when the pair columns are empty
        chosen, rejected = chosen or responses[0], rejected or responses[-1]
    if raw.get("prompt") is not None:
        prompt = text_of(raw.get("prompt"), "prompt", role="user")
    else:  # TRL implicit prompt: the user turn lives inside `chosen`
        prompt = text_of(raw.get("chosen"), "prompt", role="user") if raw.get("chosen") else ""
        if prompt and prompt.strip() == chosen:
            prompt = ""
    prompt = _clean_prompt(prompt)
    if not prompt:
        raise RowError("prompt: empty text")
    if not chosen:
        raise RowError("chosen: empty response")
    if not rejected:
        raise RowError("rejected: empty response")
    extra = _string_list(raw.get("rejected_extra"), "rejected_extra")
    if len(extra) > 1:
        raise RowError(f"rejected_extra: {len(extra)} responses; the two-rejected loss takes one")
    if ranked and extra:
        raise RowError("rejected_extra: MDPO ranks one list; two rejected need dpo/ipo/slic")
    if ranked and not responses:
        responses = [chosen, rejected]
    return {
        "id": row_id(raw),
        "image": _image_bytes(raw, load_image),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "rejected_extra": extra,
        "responses": responses,
    }


def convert_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    load_image: ImageLoader | None = None,
    ranked: bool = False,
) -> list[ConvertedRow]:
    """One output row per input row (CONVERTED_SCHEMA): a good row has error "", a bad one
    keeps only its id, empty values and the RowError message in `error`."""
    out: list[ConvertedRow] = []
    for raw in rows:
        row: ConvertedRow
        try:
            row = {**to_learner_row(raw, load_image=load_image, ranked=ranked), ERROR_COLUMN: ""}
        except RowError as err:
            row = {
                "id": row_id(raw),
                "image": b"",
                "prompt": "",
                "chosen": "",
                "rejected": "",
                "rejected_extra": [],
                "responses": [],
                ERROR_COLUMN: str(err),
            }
        out.append(row)
    return out


def convert_table(
    table: pa.Table, *, load_image: ImageLoader | None = None, ranked: bool = False
) -> pa.Table:
    """`convert_rows` on a pyarrow batch (Ray Data `map_batches(batch_format="pyarrow")`)."""
    rows = convert_rows(table.to_pylist(), load_image=load_image, ranked=ranked)
    return pa.Table.from_pylist(rows, schema=CONVERTED_SCHEMA)
