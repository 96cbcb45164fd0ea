"""Readers of the public evaluation sets: POPE question files and COCO-style caption sets.

Pure functions over file text (the caller reads the bytes, local or s3://), so each is
tested on a few hand-written rows. A row that cannot be used is quarantined with its reason,
naming the file and the line (POPE) or the entry (COCO JSON has no useful lines); a file
that cannot be used at all (not JSON, no `categories`) raises ValueError naming the file.

POPE (Li et al. 2023; the official `coco_pope_{adversarial,popular,random}.json`): JSON
Lines, one question per line,
    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
     "text": "Is there a snowboard in the image?", "label": "yes"}
(a JSON array of the same objects is accepted too). The split is named by the file:
the first of random/popular/adversarial in its name, else its stem.

COCO (`instances_*.json`): `images` [{id, file_name}], `annotations` [{image_id,
category_id}], `categories` [{id, name}]. The categories are the object vocabulary of
CHAIR; a CHAIR synonyms file (one line per class, comma-separated, the class name first,
e.g. "dining table, table, desk") adds the phrases that also name a class. A synonyms line
whose class is not a category is an error: its mentions would count as hallucinations of
an object no image can contain.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from mmalign.evaluation import EvalRequest
from mmalign.metrics.pope import POPE_SPLITS
from mmalign.metrics.vocab import ObjectVocabulary, parse_synonyms

Quarantined = dict[str, Any]  # {"file", "where", "id", "reason"}


@dataclass(frozen=True)
class PopeItem:
    """One POPE question as the file gives it; `label` True = the answer is "yes"."""

    question_id: str
    image: str  # as in the file: a name relative to the image root (or a URI)
    text: str
    label: bool
    split: str


@dataclass(frozen=True)
class CocoImage:
    """One COCO image and the distinct categories annotated on it (possibly none)."""

    id: str
    file_name: str
    objects: frozenset[str]


@dataclass(frozen=True)
class CocoSet:
    """A COCO caption set: its classes (category names, file order) and its images."""

    classes: tuple[str, ...]
    images: tuple[CocoImage, ...]
    quarantined: tuple[Quarantined, ...] = field(default=())


def _bad(source: str, where: str, reason: str, row_id: Any = None) -> Quarantined:
    return {
        "file": source,
        "where": where,
        "id": None if row_id is None else str(row_id),
        "reason": f"{source} {where}: {reason}",
    }


def pope_split_name(source: str) -> str:
    """The POPE split a file holds: coco_pope_adversarial.json -> "adversarial"."""
    stem = PurePosixPath(source.rstrip("/")).name.split(".")[0]
    for split in POPE_SPLITS:
        if split in stem.lower():
            return split
    return stem


def _pope_entries(text: str, source: str) -> list[tuple[str, Any]]:
    """(where, parsed value or the JSON error) per question of a JSONL or JSON-array file."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not a JSON array of POPE questions ({err})") from None
        return [(f"entry {i}", item) for i, item in enumerate(items)]
    out: list[tuple[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as err:
            out.append((f"line {n}", err))
    return out


def read_pope(text: str, source: str, split: str = "") -> tuple[list[PopeItem], list[Quarantined]]:
    """(questions, quarantined) of one POPE file's text; `source` names it in reasons.

    A question needs `question_id`, a non-empty `image` and `text`, and `label` "yes" or
    "no" (any case); a repeated `question_id` is quarantined, the first one kept.
    """
    split = split or pope_split_name(source)
    good: list[PopeItem] = []
    bad: list[Quarantined] = []
    seen: set[str] = set()
    for where, raw in _pope_entries(text, source):
        if isinstance(raw, json.JSONDecodeError):
            bad.append(_bad(source, where, f"not JSON ({raw.msg})"))
            continue
        if not isinstance(raw, dict):
            bad.append(_bad(source, where, f"expected an object, got {type(raw).__name__}"))
            continue
        qid = raw.get("question_id")
        missing = [k for k in ("question_id", "image", "text", "label") if raw.get(k) in (None, "")]
        if missing:
            bad.append(_bad(source, where, f"missing {missing}", qid))
            continue
        label = str(raw["label"]).strip().lower()
        if label not in ("yes", "no"):
            bad.append(
                _bad(source, where, f"label must be 'yes' or 'no', got {raw['label']!r}", qid)
            )
            continue
        if not isinstance(raw["image"], str) or not isinstance(raw["text"], str):
            bad.append(_bad(source, where, "image and text must be strings", qid))
            continue
        if str(qid) in seen:
            bad.append(_bad(source, where, f"question_id {qid!r} repeated", qid))
            continue
        seen.add(str(qid))
        good.append(PopeItem(str(qid), raw["image"], raw["text"].strip(), label == "yes", split))
    return good, bad


def _entries(data: Mapping[str, Any], key: str, source: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise ValueError(
            f"{source}: '{key}' must be a list (a COCO instances file has "
            f"images, annotations and categories), got {type(value).__name__}"
        )
    return value


def read_coco_instances(text: str, source: str) -> CocoSet:
    """The COCO set of an `instances_*.json` text; `source` names it in errors.

    Categories must each have a unique `id` and `name` (ValueError otherwise: they are the
    vocabulary). An image without `id` / `file_name`, or with a repeated id, and an
    annotation naming an unknown image or category are quarantined.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a COCO instances object, got {type(data).__name__}")
    names: dict[str, str] = {}
    for i, cat in enumerate(_entries(data, "categories", source)):
        if (
            not isinstance(cat, dict)
            or cat.get("id") is None
            or not str(cat.get("name", "")).strip()
        ):
            raise ValueError(f"{source} categories[{i}]: needs an id and a name, got {cat!r}")
        name = " ".join(str(cat["name"]).lower().split())
        if str(cat["id"]) in names or name in names.values():
            raise ValueError(
                f"{source} categories[{i}]: id {cat['id']!r} or name {name!r} repeated"
            )
        names[str(cat["id"])] = name
    bad: list[Quarantined] = []
    files: dict[str, str] = {}
    for i, img in enumerate(_entries(data, "images", source)):
        where = f"images[{i}]"
        if not isinstance(img, dict) or img.get("id") is None or not img.get("file_name"):
            bad.append(_bad(source, where, "needs an id and a file_name"))
        elif str(img["id"]) in files:
            bad.append(_bad(source, where, f"image id {img['id']!r} repeated", img["id"]))
        else:
            files[str(img["id"])] = str(img["file_name"])
    objects: dict[str, set[str]] = {i: set() for i in files}
    for i, ann in enumerate(_entries(data, "annotations", source)):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            bad.append(_bad(source, where, "expected an object"))
            continue
        image_id, cat_id = str(ann.get("image_id")), str(ann.get("category_id"))
        if image_id not in objects:
            bad.append(_bad(source, where, f"unknown image_id {ann.get('image_id')!r}"))
        elif cat_id not in names:
            bad.append(_bad(source, where, f"unknown category_id {ann.get('category_id')!r}"))
        else:
            objects[image_id].add(names[cat_id])
    images = tuple(CocoImage(i, files[i], frozenset(objects[i])) for i in files)
    return CocoSet(tuple(names.values()), images, tuple(bad))


def coco_vocabulary(
    classes: Sequence[str], synonyms_text: str = "", source: str = "synonyms"
) -> ObjectVocabulary:
    """The CHAIR vocabulary: `classes` (COCO category names) with the phrases a synonyms
    table lists for them (`parse_synonyms` format; `source` names the file in errors).

    Raises ValueError naming the line of a synonyms class that is not one of `classes`.
    """
    known = set(classes)
    table: dict[str, list[str]] = {c: [] for c in classes}
    for n, line in enumerate(synonyms_text.splitlines(), start=1):
        for cls, phrases in parse_synonyms(line).items():
            if cls not in known:
                raise ValueError(
                    f"{source} line {n}: class {cls!r} is not a category of the "
                    f"annotations (first phrase of a line names the class)"
                )
            table[cls].extend(phrases)
    return ObjectVocabulary(table, on_conflict="first")


def resolve(name: str, root: str) -> str:
    """`name` under `root` (a local directory or s3:// prefix) unless it is already absolute
    or a URI; '' root leaves it as it is."""
    if not root or name.startswith(("s3://", "/")):
        return name
    return root.rstrip("/") + "/" + name.lstrip("/")


def first_images(items: Sequence[PopeItem], n: int) -> list[PopeItem]:
    """The questions of the first `n` distinct images, in file order (n = 0: all)."""
    if not n:
        return list(items)
    keep: set[str] = set()
    for item in items:
        if len(keep) == n:
            break
        keep.add(item.image)
    return [item for item in items if item.image in keep]


def pope_coco_requests(
    pope: Sequence[tuple[Sequence[PopeItem], str]],
    coco: CocoSet,
    coco_root: str,
    describe_prompt: str,
) -> tuple[list[EvalRequest], dict[str, frozenset[str]]]:
    """(requests, ground truths) of a POPE + COCO evaluation.

    `pope` holds (questions of one file, the root its image names are relative to). Each
    question is asked as written (`text`, label from the file); each COCO image gets one
    description request, scored by CHAIR against its categories. An image is named by its
    resolved URI, so an image in both sets is read once and one answer per (image, prompt)
    is generated.
    """
    requests = [
        EvalRequest(resolve(q.image, root), q.text, "pope", q.split, "", q.label)
        for items, root in pope
        for q in items
    ]
    truths = {resolve(img.file_name, coco_root): img.objects for img in coco.images}
    requests += [EvalRequest(uri, describe_prompt, "describe") for uri in truths]
    return requests, truths


def object_list(objects: Sequence[str]) -> str:
    """ "a dog", "a dog and an apple", "a dog, a cat and a kite"."""
    named = [f"{'an' if o[:1] in 'aeiou' else 'a'} {o}" for o in objects]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def coco_judge_pairs(
    coco: CocoSet, image_root: str, n: int = 0, offset: int = 0, question: str = ""
) -> list[dict[str, Any]]:
    """Held-out judge pairs with a known better answer from a COCO set (n = 0: all images
    with >= 1 category, from `offset`): JudgeEngine rows with `objects`, `label`, `kind`.

    The better answer names the image's categories (up to 3, file order of the classes);
    the worse one either swaps one of them for the absent class that co-occurs with them
    most ("hallucination", POPE's adversarial choice) or, with >= 2 categories, drops the
    last one ("omission"). Kinds alternate every two pairs and the better answer sits in
    slot A on even pairs, slot B on odd ones, so neither a position-only guesser (0.5) nor
    kind leaks through the slot.
    """
    from mmalign.evaluation import DEFAULT_DESCRIBE_PROMPT
    from mmalign.metrics.pope import ObjectStats, sample_negatives

    question = question or DEFAULT_DESCRIBE_PROMPT
    stats = ObjectStats.from_annotations(img.objects for img in coco.images)
    order = {c: i for i, c in enumerate(coco.classes)}
    rows: list[dict[str, Any]] = []
    annotated = [img for img in coco.images if img.objects][offset:]
    for img in annotated[:n] if n else annotated:
        i = len(rows)
        present = sorted(img.objects, key=order.__getitem__)[:3]
        omit = len(present) >= 2 and ((i // 2) % 2 == 1 or len(img.objects) == len(order))
        if omit:
            worse = present[:-1]
        elif len(img.objects) < len(order):
            # adversarial: the rng is not used (ties break by frequency, then class order)
            (absent,) = sample_negatives(
                img.objects, coco.classes, 1, "adversarial", stats, random.Random(0)
            )
            worse = [*present[:-1], absent]
        else:
            continue  # one class, and it is the whole vocabulary: nothing to invent or omit
        kind = "omission" if omit else "hallucination"
        better_text = f"There is {object_list(present)} in the image."
        worse_text = f"There is {object_list(worse)} in the image."
        flip = i % 2 == 1
        rows.append(
            {
                "image": {"bytes": None, "path": resolve(img.file_name, image_root)},
                "question": question,
                "response_a": worse_text if flip else better_text,
                "response_b": better_text if flip else worse_text,
                "objects": sorted(img.objects),
                "label": "b" if flip else "a",
                "kind": kind,
            }
        )
    return rows
