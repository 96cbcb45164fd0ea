"""The rows in flight between stages, as types, and the references that stand for them.

Three contracts (their Arrow schemas and builders are in `mmalign.schema`):
- `PromptRow` (`schema.PROMPT_SCHEMA`, `schema.prompt_record`): what samplers, BDHS and
  the judge read; loaded by `mmalign.io.read_prompts` and by the online prompt source
  (operators/prompt_source.py, whose rows add `idx` and `error`).
- `PreferenceRow` (`schema.PREFERENCE_SCHEMA`, `schema.preference_row`): the stored,
  TRL-compatible Parquet record.
- `LearnerRow` (Arrow form `mmalign.preference_rows.LEARNER_SCHEMA`): what
  `PreferenceLearner.step` trains on: one image and plain strings. The online loop's pair
  builders (`mmalign.online`) emit `OnlinePair`s, learner rows that may still hold a
  `RowRef`.

Rows stay plain dicts (Ray Data and pyarrow build them); the TypedDicts name their keys and
value types. What an image value holds, by stage (said here once):
- `ImageStruct` {bytes, path}: every stored row (Parquet, prompt and preference rows).
  Bytes win; a path-only struct is read where the pixels are needed
  (`mmalign.io.load_image_bytes`). The online prompt source always fills the bytes.
- encoded PNG/JPEG `bytes`: learner rows built by `mmalign.preference_rows`.
- a PIL image: rows read with `datasets` (its Image feature decodes to PIL).
  Engines accept these three (`ImageValue`) and decode them themselves
  (`mmalign.logprobs.to_pil`); pixels never travel through the driver.
- a `RowRef`: only on the online driver, standing for a prompt row that stays in the
  object store (the driver's prompt stubs, `OnlinePair.image`); the actor that receives it
  resolves it (`resolve_rows`, `resolve_pairs`: `ray.get` inside the actor) before an
  engine sees the row. A retried call resends the same refs, which stay valid while the
  driver holds the `PromptSource`.

Ray is imported inside the resolving functions only: importing this module needs no Ray.
"""

# No `from __future__ import annotations`: the TypedDicts' NotRequired markers must be real
# objects for `__required_keys__` to be right at run time (tests compare them to the schemas).
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NotRequired, TypeAlias, TypedDict, cast

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# ------------------------------------------------------------------ row types


@dataclass(frozen=True)
class RowRef:
    """One prompt row in the object store: (block ref, row offset inside the block)."""

    block: Any  # ray.ObjectRef of a pyarrow block (operators.prompt_source.OUTPUT_SCHEMA)
    offset: int


class ImageStruct(TypedDict):
    """One schema IMAGE struct: encoded bytes, or a local / s3:// path (bytes win)."""

    bytes: bytes | None
    path: str | None


ImageValue: TypeAlias = "ImageStruct | bytes | PILImage"
"""An image as engines accept it (module docstring: which stage holds which form)."""


class ContentPart(TypedDict):
    type: str  # "text" | "image"
    text: str | None


class Message(TypedDict):
    role: str  # "user" | "assistant"
    content: list[ContentPart]


class PromptRow(TypedDict):
    """A PROMPT_SCHEMA row."""

    id: str
    prompt: str  # user text without the image placeholder
    images: list[ImageStruct]
    reference: str  # the reference (chosen) answer; "" when unknown
    rejected: str  # an existing rejected answer; "" when none
    objects: list[str]  # annotated object classes; [] when unknown
    source: str


class PreferenceRow(TypedDict):
    """A PREFERENCE_SCHEMA row, as stored in Parquet."""

    id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    images: list[ImageStruct]
    rejected_images: list[ImageStruct] | None
    rejected_extra: list[str]
    responses: list[str]
    source: str
    method: str
    meta: dict[str, Any]  # a META struct (`schema.make_meta`)


class _PairText(TypedDict):
    prompt: str
    chosen: str
    rejected: str
    rejected_extra: NotRequired[list[str]]  # at most one (the two-rejected loss)


class LearnerRow(_PairText):
    """One training example of `PreferenceLearner.step`. `responses` ranks answers best
    first (MDPO). Rows from `mmalign.preference_rows` carry every key (`image` as bytes);
    the online loop adds `source` and `version` to its offline rows."""

    image: ImageValue
    id: NotRequired[str]
    responses: NotRequired[list[str]]


class OnlinePair(_PairText):
    """An online pair (`mmalign.online`): a learner row whose `image` may still be a RowRef
    and whose `prompt` is then "" (`resolve_pairs` fills both in the learner)."""

    id: str  # `mmalign.online.pair_id`
    image: "ImageValue | RowRef"
    source: str  # "online" | "online-bdhs"
    version: int  # the policy weight version that sampled it
    step: int
    bdhs_similarity: NotRequired[float]
    bdhs_tries: NotRequired[int]


class PromptStub(TypedDict):
    """The online driver's stand-in for a prompt row: its id and a RowRef as its image."""

    id: str
    prompt: str  # "": the row's text stays in the object store too
    images: list[RowRef]


# ------------------------------------------------------------------ references


@dataclass
class PromptSource:
    """Driver-side view of the materialized prompt set: block refs and an index, no rows
    (built by `operators.prompt_source.read_prompt_source`).

    `table[i]` = (idx, block position, offset) of the i-th usable row in input order, so
    `batch_indices(len(source), ...)` draws the same rows as the old in-memory list did.
    """

    blocks: list[Any]
    table: list[tuple[int, int, int]]
    ids: list[str]
    quarantine: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)

    def refs(self, positions: Sequence[int]) -> list[RowRef]:
        return [RowRef(self.blocks[self.table[i][1]], self.table[i][2]) for i in positions]


def resolve_rows(refs: Sequence[RowRef]) -> list[PromptRow]:
    """The prompt rows behind `refs`, in order (with the source's `idx` and `error` too);
    called inside the actor that needs them, each distinct block fetched once. No refs, no
    Ray call."""
    if not refs:
        return []
    import ray
    from ray.data.block import BlockAccessor

    order = list(dict.fromkeys(r.block for r in refs))
    tables = dict(
        zip(order, (BlockAccessor.for_block(b).to_arrow() for b in ray.get(order)), strict=True)
    )
    return [cast(PromptRow, tables[r.block].slice(r.offset, 1).to_pylist()[0]) for r in refs]


def resolve_pairs(rows: Sequence[OnlinePair | LearnerRow]) -> list[LearnerRow]:
    """Rows whose `image` is a RowRef get that prompt row's image and prompt (the driver
    builds online pairs without either); other rows pass unchanged (copied)."""
    out: list[dict[str, Any]] = [dict(r) for r in rows]
    lazy = [i for i, r in enumerate(out) if isinstance(r.get("image"), RowRef)]
    for i, rec in zip(lazy, resolve_rows([out[i]["image"] for i in lazy]), strict=True):
        out[i]["image"], out[i]["prompt"] = rec["images"][0], rec["prompt"]
    return cast(list[LearnerRow], out)
