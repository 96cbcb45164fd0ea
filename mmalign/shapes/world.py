"""ShapesWorld: deterministic synthetic images of coloured shapes with LLaVA-style tasks.

Every record is one conversation about one image:

    {"id": "sft-000012", "image": <PNG bytes>, "task": "describe",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the image in detail."},
                       {"from": "gpt", "value": "There is a red circle. There is a blue box."}],
     "objects": [{"colour": "red", "shape": "circle", "name": "red circle",
                  "x": 9.5, "y": 20.0, "size": 10}, ...]}

The "sft" and "pref" splits carry a co-occurrence bias (image with the trigger of a bias
pair -> its partner is present with probability `bias_strength`); "eval" draws objects
independently, so a model that learnt the bias hallucinates the partner there. Record i
of a split depends only on (seed, split, i): growing a split keeps its first records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mmalign.shapes import templates as T
from mmalign.shapes.render import render, to_png
from mmalign.shapes.vocab import OBJECT_CLASSES, SHAPE_SYNONYMS

SPLITS: tuple[str, ...] = ("sft", "pref", "eval")
TASKS: tuple[str, ...] = ("describe", "existence", "count", "colour", "position")
BIASED_SPLITS: frozenset[str] = frozenset({"sft", "pref"})


@dataclass(frozen=True)
class WorldConfig:
    """How ShapesWorld images and conversations are generated."""

    seed: int = 0
    """Master seed; record i of split s is drawn from an RNG seeded by (seed, s, i)."""
    image_size: int = 32
    """Square image side in pixels."""
    min_objects: int = 1
    """Fewest objects in an image."""
    max_objects: int = 4
    """Most objects in an image (all of distinct classes)."""
    min_size: int = 8
    """Smallest object bounding-box side in pixels."""
    max_size: int = 12
    """Largest object bounding-box side in pixels."""
    bias_pairs: tuple[tuple[str, str], ...] = (
        ("red circle", "blue square"),
        ("green triangle", "yellow cross"),
        ("purple square", "orange circle"),
        ("yellow circle", "green square"),
    )
    """(trigger, partner) object classes; no class may appear in two pairs."""
    bias_strength: float = 0.85
    """P(partner present | trigger present) in the biased splits ("sft", "pref")."""
    caption_noise: float = 0.0
    """Annotation noise of the "sft" split only: for each present trigger whose partner is
    absent, P that the record's answers claim the partner anyway (descriptions name it right
    after the trigger; an existence "Yes." may be about it). Noisy instruction data that
    teaches a language prior overriding the image; "pref" and "eval" stay faithful, and
    count / colour / position answers always follow the true objects."""
    hard_negatives: tuple[tuple[str, float], ...] = (("pref", 0.5),)
    """(split, p): with prob p an existence question about an absent object draws it from
    the sibling classes (same colour or same shape as a present object), otherwise, and in
    unlisted splits, from all absent classes (about two thirds of those are siblings too).
    Hallucination-probing prompts: an answer by colour alone fails on siblings."""
    synonym_prob: float = 0.25
    """Probability that a shape word in a caption/question is a synonym ("disc", "box")."""
    colour_jitter: int = 12
    """Max per-channel RGB jitter of an object's colour."""
    clutter_specks: int = 3
    """Up to this many grey 1-2 px specks per image (not objects)."""
    noise_std: float = 0.02
    """Std of per-pixel Gaussian noise, as a fraction of the 0..255 range."""
    task_weights: tuple[tuple[str, float], ...] = (
        ("describe", 0.4),
        ("existence", 0.3),
        ("count", 0.1),
        ("colour", 0.1),
        ("position", 0.1),
    )
    """Relative frequency of each task (names from TASKS)."""
    split_sizes: tuple[tuple[str, int], ...] = (("sft", 20000), ("pref", 2000), ("eval", 500))
    """Number of records of each split."""
    _sizes: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"WorldConfig.{name}: {msg}")

        if not 1 <= self.min_objects <= self.max_objects <= len(OBJECT_CLASSES):
            raise bad("max_objects", "need 1 <= min_objects <= max_objects <= 24")
        if not 2 <= self.min_size <= self.max_size <= self.image_size // 2:
            raise bad("max_size", "need 2 <= min_size <= max_size <= image_size / 2")
        seen: set[str] = set()
        for pair in self.bias_pairs:
            for name in pair:
                if name not in OBJECT_CLASSES:
                    raise bad("bias_pairs", f"{name!r} is not an object class")
                if name in seen:
                    raise bad("bias_pairs", f"{name!r} appears in two pairs")
                seen.add(name)
        if not 0.0 <= self.bias_strength <= 1.0:
            raise bad("bias_strength", "must be in [0, 1]")
        for item in self.hard_negatives:
            ok = isinstance(item, tuple) and len(item) == 2 and item[0] in SPLITS
            if not ok or not 0.0 <= item[1] <= 1.0:
                raise bad("hard_negatives", f"need (split in {SPLITS}, p in [0, 1]), got {item!r}")
        if len({split for split, _ in self.hard_negatives}) != len(self.hard_negatives):
            raise bad("hard_negatives", "a split is listed twice")
        if not 0.0 <= self.caption_noise <= 1.0:
            raise bad("caption_noise", "must be in [0, 1]")
        if not 0.0 <= self.synonym_prob <= 1.0:
            raise bad("synonym_prob", "must be in [0, 1]")
        for task, w in self.task_weights:
            if task not in TASKS or w < 0:
                raise bad("task_weights", f"unknown task {task!r} or negative weight")
        if sum(w for _, w in self.task_weights) <= 0:
            raise bad("task_weights", "weights must not all be zero")
        sizes = dict(self.split_sizes)
        if set(sizes) - set(SPLITS) or any(n < 0 for n in sizes.values()):
            raise bad("split_sizes", f"splits must be among {SPLITS} with sizes >= 0")
        object.__setattr__(self, "_sizes", sizes)

    def split_size(self, split: str) -> int:
        """Number of records of `split` (0 when not listed)."""
        return self._sizes.get(split, 0)


def generate_split(cfg: WorldConfig, split: str, n: int | None = None) -> list[dict]:
    """Records 0..n-1 of `split` (n defaults to the configured split size)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    count = cfg.split_size(split) if n is None else n
    return [generate_record(cfg, split, i) for i in range(count)]


def generate_record(cfg: WorldConfig, split: str, index: int) -> dict:
    """Record `index` of `split`; a pure function of (cfg, split, index)."""
    rng = random.Random(f"shapesworld:{cfg.seed}:{split}:{index}")
    names = sample_classes(cfg, rng, biased=split in BIASED_SPLITS)
    objects = place_objects(cfg, names, rng)
    image = render(
        objects, cfg.image_size, rng, cfg.colour_jitter, cfg.clutter_specks, cfg.noise_std
    )
    tasks, weights = zip(*cfg.task_weights, strict=True)
    task = rng.choices(tasks, weights=weights)[0]
    claimed = objects
    if split == "sft" and cfg.caption_noise > 0:  # no extra draw at 0: records unchanged
        claimed = claimed_objects(cfg, objects, rng)
    hard = dict(cfg.hard_negatives).get(split, 0.0)
    task, question, answer = make_task(cfg, task, objects, rng, claimed=claimed, hard=hard)
    return {
        "id": f"{split}-{index:06d}",
        "image": to_png(image),
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "objects": objects,
        "task": task,
    }


def sample_classes(cfg: WorldConfig, rng: random.Random, biased: bool) -> list[str]:
    """Distinct object classes of one image.

    Unbiased: k uniform in [min_objects, max_objects], classes uniform without
    replacement. Biased: then, for each pair whose trigger is present, the partner is made
    present with prob bias_strength and absent otherwise, swapping a class that belongs
    to no pair in or out (when none is left, a class of a pair not yet processed), so
    P(partner | trigger) equals bias_strength up to the rare image where nothing can
    be swapped.
    """
    k = rng.randint(cfg.min_objects, cfg.max_objects)
    names = rng.sample(OBJECT_CLASSES, k)
    if not biased:
        return names
    in_pairs = {c for pair in cfg.bias_pairs for c in pair}
    free = [c for c in OBJECT_CLASSES if c not in in_pairs]
    settled: set[str] = set()  # pairs already enforced keep their trigger and partner
    for trigger, partner in cfg.bias_pairs:
        if trigger not in names:
            continue
        want = rng.random() < cfg.bias_strength
        if want and partner not in names:
            if len(names) < cfg.max_objects:
                names.append(partner)
            else:
                # Prefer replacing a class outside every pair; else one of a pair not yet
                # settled (its own trigger check comes later and sees the change).
                swappable = [i for i, c in enumerate(names) if c not in in_pairs] or [
                    i for i, c in enumerate(names) if c != trigger and c not in settled
                ]
                if swappable:
                    names[rng.choice(swappable)] = partner
        elif not want and partner in names:
            spare = [c for c in free if c not in names]
            names[names.index(partner)] = rng.choice(spare)
        settled.update((trigger, partner))
    return names


def claimed_objects(cfg: WorldConfig, objects: list[dict], rng: random.Random) -> list[dict]:
    """What a noisy annotator says is in the image: `objects`, plus, with prob caption_noise
    per present trigger whose partner is absent, the partner right after the trigger
    (same place; the record's "objects" stay the truth)."""
    present = {o["name"] for o in objects}
    partners = {t: p for t, p in cfg.bias_pairs if t in present and p not in present}
    claimed: list[dict] = []
    for obj in objects:
        claimed.append(obj)
        partner = partners.get(obj["name"])
        if partner is not None and rng.random() < cfg.caption_noise:
            colour, shape = partner.split(" ")
            claimed.append({**obj, "colour": colour, "shape": shape, "name": partner})
    return claimed


def place_objects(cfg: WorldConfig, names: list[str], rng: random.Random) -> list[dict]:
    """Non-overlapping placements (1 px gap); an object that finds no room is dropped.

    Returns annotations in reading order (grid row, then x), the order captions use.
    """
    boxes: list[tuple[float, float, float, float]] = []
    objects: list[dict] = []
    for name in names:
        for _ in range(200):
            size = rng.randint(cfg.min_size, cfg.max_size)
            x0 = rng.randint(0, cfg.image_size - size)
            y0 = rng.randint(0, cfg.image_size - size)
            box = (x0 - 1, y0 - 1, x0 + size + 1, y0 + size + 1)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]
                   for b in boxes):  # fmt: skip
                boxes.append((x0, y0, x0 + size, y0 + size))
                colour, shape = name.split(" ")
                objects.append(
                    {"colour": colour, "shape": shape, "name": name,
                     "x": x0 + size / 2, "y": y0 + size / 2, "size": size}
                )  # fmt: skip
                break
    objects.sort(key=lambda o: (grid_cell(o, cfg.image_size)[0], o["x"]))
    return objects


def grid_cell(obj: dict, image_size: int) -> tuple[int, int]:
    """(row, column) of the object's centre on a 3x3 grid."""
    row = min(2, int(obj["y"] * 3 // image_size))
    col = min(2, int(obj["x"] * 3 // image_size))
    return row, col


def surface(obj_name: str, cfg: WorldConfig, rng: random.Random) -> str:
    """An object phrase for text: canonical, or with a shape synonym (synonym_prob)."""
    colour, shape = obj_name.split(" ")
    return f"{colour} {shape_word(shape, cfg, rng)}"


def shape_word(shape: str, cfg: WorldConfig, rng: random.Random) -> str:
    synonyms = SHAPE_SYNONYMS[shape]
    if len(synonyms) > 1 and rng.random() < cfg.synonym_prob:
        return rng.choice(synonyms[1:])
    return shape


def describe(objects: list[dict], cfg: WorldConfig, rng: random.Random) -> str:
    """Detailed description: one "There is a <colour> <shape>." per object, reading order."""
    return " ".join(T.THERE_IS.format(obj=surface(o["name"], cfg, rng)) for o in objects)


def _sibling(name: str, present: list[str]) -> bool:
    """`name` shares its colour or its shape with one of `present`."""
    colour, shape = name.split(" ")
    return any(p.split(" ")[0] == colour or p.split(" ")[1] == shape for p in present)


def make_task(
    cfg: WorldConfig,
    task: str,
    objects: list[dict],
    rng: random.Random,
    claimed: list[dict] | None = None,
    hard: float = 0.0,
) -> tuple[str, str, str]:
    """(task, question, answer) for one image. A colour question needs a shape that occurs
    once in the image; when there is none the record falls back to a description.
    Descriptions and existence answers follow `claimed` (default: the true `objects`);
    `hard`: P that a "No" question names a sibling class (see WorldConfig.hard_negatives)."""
    claimed = objects if claimed is None else claimed
    present = [o["name"] for o in claimed]
    if task == "existence":
        if rng.random() < 0.5:
            name, answer = rng.choice(present), T.YES
        else:
            absent = [c for c in OBJECT_CLASSES if c not in present]
            if hard > 0 and rng.random() < hard:
                absent = [c for c in absent if _sibling(c, present)] or absent
            name, answer = rng.choice(absent), T.NO
        return task, T.EXISTENCE_PROMPT.format(obj=surface(name, cfg, rng)), answer
    if task == "count":
        n = len(objects)
        answer = T.COUNT_ANSWER_ONE if n == 1 else T.COUNT_ANSWER.format(n=n)
        return task, T.COUNT_PROMPT, answer
    if task == "colour":
        shapes = [o["shape"] for o in objects]
        unique = [o for o in objects if shapes.count(o["shape"]) == 1]
        if unique:
            obj = rng.choice(unique)
            word = shape_word(obj["shape"], cfg, rng)
            question = T.COLOUR_PROMPT.format(shape=word)
            return task, question, T.COLOUR_ANSWER.format(shape=word, colour=obj["colour"])
        task = "describe"
    if task == "position":
        obj = rng.choice(objects)
        phrase = surface(obj["name"], cfg, rng)
        where = T.grid_name(*grid_cell(obj, cfg.image_size))
        return (
            task,
            T.POSITION_PROMPT.format(obj=phrase),
            T.POSITION_ANSWER.format(obj=phrase, where=where),
        )
    return "describe", rng.choice(T.DESCRIBE_PROMPTS), describe(claimed, cfg, rng)
