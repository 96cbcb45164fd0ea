"""Readers and writers for the record contracts in `mmalign.schema` (local or s3://).

Inputs are normalised row by row into prompt records: a row that cannot be used becomes
a quarantine entry `{id, reason, source}` and the rest go on. A dataset whose *columns*
cannot work at all (e.g. neither `image` nor `images`) fails at once, naming the columns
it has — never silently dropping images.

Supported inputs:
- LLaVA-instruct JSON / JSONL: `{"id", "image": "rel/path.png", "conversations": [
  {"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`; the
  first human/gpt exchange is used. Optional `objects` (annotated classes) and `rejected`.
- Parquet: our preference rows, our prompt records, TRL preference datasets
  (conversational or plain-string prompt/chosen/rejected + images), or generic
  `image`/`images` + `prompt`/`question` + `answer`/`reference`/`chosen` columns.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmalign import storage
from mmalign.rows import PromptRow
from mmalign.schema import (
    PREFERENCE_SCHEMA,
    PROMPT_SCHEMA,
    RowError,
    message_text,
    prompt_record,
    with_hf_metadata,
)

_PROMPT_KEYS = ("prompt", "question", "query", "instruction")
_ANSWER_KEYS = ("reference", "answer", "chosen", "response")


def detect_format(uri: str) -> str:
    """'shapesworld' | 'llava-json' | 'parquet' from the URI."""
    if uri.startswith("shapesworld:"):
        return "shapesworld"
    low = uri.lower().rstrip("/")
    if low.endswith((".json", ".jsonl")):
        return "llava-json"
    return "parquet"  # a .parquet file or a directory/prefix of shards


def _text(value: Any) -> str:
    """Plain text from a string or a conversational message list."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return message_text(value)
    raise RowError(f"expected text or messages, got {type(value).__name__}")


def _resolve(path: str, image_root: str) -> str:
    if storage.is_s3(path) or os.path.isabs(path) or not image_root:
        return path
    return storage.join(image_root, path)


class InputError(ValueError):
    """An input that cannot be read at all (not one bad row): the message names the file and
    where it fails. Pipelines exit with it, without a traceback."""


def check_columns(columns: Iterable[str], uri: str) -> None:
    """Fail loudly if a tabular input cannot carry images or prompts at all."""
    cols = set(columns)
    if not cols & {"image", "images"}:
        raise InputError(f"{uri}: no 'image' or 'images' column (columns: {sorted(cols)})")
    if not cols & set(_PROMPT_KEYS):
        raise InputError(f"{uri}: no prompt column {list(_PROMPT_KEYS)} (columns: {sorted(cols)})")


# Key of a placeholder row for an input line that could not be parsed: the reader keeps
# the line's place (and a stable id) so the quarantine names it and the other rows go on.
UNREADABLE = "__unreadable__"


def _str_field(value: Any, name: str) -> str:
    """A text field of a raw row: str (or None = ""), valid Unicode, else RowError naming it."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{name}: expected text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate, e.g. "\ud800" escaped in JSON
        raise RowError(f"{name}: invalid Unicode at character {err.start}") from None
    return value


def _llava_turns(raw: dict[str, Any]) -> tuple[str, str]:
    """(human text, gpt text) of the first exchange of a LLaVA `conversations` list."""
    turns = raw.get("conversations")
    if not isinstance(turns, list):
        raise RowError(f"conversations: expected a list of turns, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"conversations[{i}]: expected an object, got {type(turn).__name__}")
    human = next((t for t in turns if t.get("from") == "human"), None)
    gpt = next((t for t in turns if t.get("from") == "gpt"), None)
    if human is None:
        raise RowError("conversations: no 'human' turn")
    prompt = _str_field(human.get("value"), "conversations.human.value")
    return prompt, _str_field((gpt or {}).get("value"), "conversations.gpt.value")


def normalize_row(raw: Any, image_root: str = "", source: str = "") -> PromptRow:
    """One input row (any supported layout) -> prompt record. Raises RowError naming the field."""
    if not isinstance(raw, dict):
        raise RowError(f"row: expected an object, got {type(raw).__name__}")
    if UNREADABLE in raw:
        raise RowError(str(raw[UNREADABLE]))
    if "conversations" in raw:  # LLaVA-instruct
        prompt, reference = _llava_turns(raw)
        images: Any = raw.get("image")
    else:
        pkey = next((k for k in _PROMPT_KEYS if k in raw), None)
        prompt = _str_field(_text(raw.get(pkey)), pkey or "prompt") if pkey else ""
        akey = next((k for k in _ANSWER_KEYS if raw.get(k) not in (None, "", [])), None)
        reference = _str_field(_text(raw.get(akey)), akey or "reference") if akey else ""
        images = raw.get("images", raw.get("image"))
    if images is None or images == [] or images == "":
        raise RowError("image: missing")
    if not isinstance(images, list):
        images = [images]
    refs = []
    for img in images:
        if isinstance(img, str):
            img = _resolve(_str_field(img, "image"), image_root)
        elif isinstance(img, dict) and img.get("path") and not img.get("bytes"):
            img = {"bytes": None, "path": _resolve(_str_field(img["path"], "image"), image_root)}
        elif not isinstance(img, (bytes, dict)):
            raise RowError(f"image: expected a path, bytes or {{bytes, path}}, got {img!r:.40}")
        refs.append(img)
    rid = raw.get("id")
    if rid is None or str(rid) == "":
        raise RowError("id: missing")
    objects = raw.get("objects") or []
    if not isinstance(objects, list):
        raise RowError(f"objects: expected a list, got {type(objects).__name__}")
    # every text field is checked: one lone surrogate left in a record would end the whole
    # Ray Data batch (Arrow cannot encode it), not just this row
    objects = [_str_field(o["name"] if isinstance(o, dict) else str(o), "objects") for o in objects]
    return prompt_record(
        id=_str_field(str(rid), "id"),
        prompt=prompt,
        images=refs,
        reference=reference.strip(),
        rejected=_str_field(_text(raw.get("rejected")), "rejected").strip(),
        objects=objects,
        source=_str_field(source or str(raw.get("source") or ""), "source"),
    )


def normalize_rows(
    rows: Iterable[dict[str, Any]], image_root: str = "", source: str = ""
) -> tuple[list[PromptRow], list[dict[str, Any]]]:
    """(good prompt records, quarantine entries) — a bad row never stops the others.

    Ids are unique in the output: a row whose id an earlier good row has is quarantined
    (the first one is kept), since ids key resumes, joins and the written rows."""
    good: list[PromptRow] = []
    bad: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(rows):
        try:
            row = normalize_row(raw, image_root, source)
            if row["id"] in seen:
                raise RowError("id: duplicate of an earlier row (the first one is kept)")
            seen.add(row["id"])
            good.append(row)
        except (RowError, ValueError, TypeError, KeyError) as err:
            rid = raw.get("id") if isinstance(raw, dict) else None
            rid = f"row-{i}" if rid in (None, "") else rid
            bad.append({"id": printable(str(rid)), "reason": str(err), "source": source})
    return good, bad


def printable(text: str) -> str:
    """`text` with any invalid Unicode (a lone surrogate) written as a backslash escape, so
    a quarantine entry can always be written (JSON, Arrow) and read back as it was shown."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ------------------------------------------------------------------ raw readers


def read_llava_json(uri: str) -> list[Any]:
    """The raw rows of a LLaVA JSON list or JSONL file.

    JSONL is read line by line: a line that is not UTF-8 or not valid JSON becomes a
    placeholder row `{id: "line-N", UNREADABLE: reason}` that normalize_row quarantines,
    so one bad line costs one row. A JSON list is one document: if it cannot be decoded
    or parsed at all, the whole file fails naming the file and the byte offset.
    """
    data = storage.read_bytes(uri)
    if uri.lower().endswith(".jsonl"):
        return [row for n, line in enumerate(data.split(b"\n"), 1) if (row := _jsonl_row(line, n))]
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{uri}: not UTF-8 at byte offset {err.start}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{uri}: not valid JSON at byte offset {err.pos} ({err.msg})") from None
    if not isinstance(items, list):
        raise InputError(f"{uri}: LLaVA JSON must be a list of conversations")
    return items


def _jsonl_row(line: bytes, n: int) -> Any:
    """One JSONL line -> its row, a placeholder naming why it is unreadable, or None (blank)."""
    if not line.strip():
        return None
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        reason = f"line {n}: not UTF-8 at byte {err.start} of the line"
    except json.JSONDecodeError as err:
        reason = f"line {n}: not valid JSON ({err.msg} at column {err.colno})"
    return {"id": f"line-{n}", UNREADABLE: reason}


def read_parquet(uri: str) -> pa.Table:
    """A Parquet file or a directory/prefix of shards (hidden/temp files ignored)."""
    fs, path = storage.filesystem(uri)

    def read() -> pa.Table:
        try:
            return pq.read_table(path, filesystem=fs)
        except pa.ArrowInvalid as err:  # not Parquet: permanent, never retried
            raise storage.StorageError(f"{uri}: cannot read Parquet ({err})") from None

    if storage.is_s3(uri):  # transient endpoint errors are retried, then name the URI
        return storage.with_retries(uri, read)
    try:
        return read()
    except storage.StorageError:
        raise
    except OSError as err:
        raise storage.StorageError(f"{uri}: cannot read Parquet ({err})") from None


def read_prompts(
    uri: str, image_root: str = "", max_rows: int = 0, world_seed: int = 0
) -> tuple[list[PromptRow], list[dict[str, Any]]]:
    """Any supported input -> (prompt records, quarantine). Single-process reader."""
    fmt = detect_format(uri)
    if fmt == "shapesworld":
        from mmalign.shapes.records import shapes_rows

        raw = shapes_rows(uri.split(":", 1)[1] or "pref", seed=world_seed, max_rows=max_rows)
        root, source = "", "shapesworld"
    elif fmt == "llava-json":
        raw = read_llava_json(uri)
        root, source = image_root or os.path.dirname(uri), uri
    else:
        table = read_parquet(uri)
        check_columns(table.column_names, uri)
        raw, root, source = table.to_pylist(), image_root, uri
    if max_rows:
        raw = raw[:max_rows]
    return normalize_rows(raw, root, source)


def load_image_bytes(image: dict[str, Any]) -> bytes:
    """The encoded bytes of an image struct (reading its path/URI when needed)."""
    if image.get("bytes"):
        return bytes(image["bytes"])
    if image.get("path"):
        return storage.read_bytes(image["path"])
    raise RowError("images: neither bytes nor path")


def decode_image(image: dict[str, Any]) -> Any:
    """PIL RGB image from an image struct. Only actors that need pixels call this."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(load_image_bytes(image))).convert("RGB")
    except (OSError, ValueError) as err:
        raise RowError(f"images: unreadable image ({err})") from None


# ------------------------------------------------------------------ writers


def write_parquet(rows: list[dict[str, Any]], uri: str, schema: pa.Schema) -> None:
    """Write rows as one Parquet file (atomic locally; S3 objects appear whole on close)."""
    table = pa.Table.from_pylist(rows, schema=with_hf_metadata(schema))
    fs, path = storage.filesystem(uri)
    if storage.is_s3(uri):  # the object appears whole on close; a retry rewrites it
        storage.with_retries(uri, lambda: pq.write_table(table, path, filesystem=fs))
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_preferences(rows: list[dict[str, Any]], uri: str) -> None:
    write_parquet(rows, uri, PREFERENCE_SCHEMA)


def write_prompts(rows: list[dict[str, Any]], uri: str) -> None:
    write_parquet(rows, uri, PROMPT_SCHEMA)


def write_jsonl(rows: Iterable[dict[str, Any]], uri: str) -> None:
    text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
    storage.write_bytes(uri, text.encode())


def write_llava_json(records: list[dict[str, Any]], out_dir: str, name: str = "data.json") -> str:
    """Write LLaVA-instruct JSON with images as files under `<out_dir>/images/`.

    `records` carry `image` as PNG bytes (the ShapesWorld generator's form). Returns the
    JSON's URI.
    """
    items = []
    for rec in records:
        rel = f"images/{rec['id']}.png"
        storage.write_bytes(storage.join(out_dir, rel), rec["image"])
        item = {k: v for k, v in rec.items() if k != "image"}
        item["image"] = rel
        items.append(item)
    uri = storage.join(out_dir, name)
    storage.write_bytes(uri, json.dumps(items, indent=1).encode())
    return uri


def iter_shards(uri: str) -> Iterator[str]:
    """Parquet shard files under a directory/prefix (skipping temp files)."""
    for path in storage.list_files(uri):
        base = path.rsplit("/", 1)[-1]
        if base.endswith(".parquet") and not base.startswith("."):
            yield path
