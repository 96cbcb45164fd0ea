"""Object vocabulary: map free text to canonical object classes (the CHAIR / POPE vocabulary).

An `ObjectVocabulary` is built from `canonical class -> surface phrases`. `find_mentions`
scans a text once, left to right, over lower-cased word tokens and at each position takes
the *longest* phrase that matches there ("hot dog" wins over "dog", "red disc" over
nothing), so one stretch of text is never counted twice. Word boundaries come from the
tokenisation: a token is a maximal run of letters/digits, so "t-shirt" and "t shirt" are
the same two tokens and "scatter" never matches "cat".

Plurals: the last word of every phrase is also accepted in plural form, by simple English
rules plus a few irregulars ("circle" -> "circles", "box" -> "boxes", "person" ->
"people"). Phrases given explicitly always win over generated plurals.

Known limitations (accepted; CHAIR has the same ones in its simplest form):
- Negation and hedging are not understood: "there is no red circle" still mentions
  "red circle". Our captions and the tiny model's descriptions rarely negate; a caller that
  needs it must strip such clauses first.
- Attributes are only matched as written inside a phrase: "a red circle" matches
  "red circle", "a circle that is red" or "a red and blue circle" do not.
- Pronouns and counts are not resolved ("two red circles" is one mention).
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# A token is a maximal run of unicode letters/digits; everything else separates words.
_TOKEN = re.compile(r"[^\W_]+")

_IRREGULAR_PLURALS: dict[str, str] = {
    "person": "people",
    "child": "children",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "goose": "geese",
    "ox": "oxen",
    "knife": "knives",
    "wife": "wives",
    "life": "lives",
    "leaf": "leaves",
    "loaf": "loaves",
    "half": "halves",
    "calf": "calves",
    "shelf": "shelves",
    "wolf": "wolves",
    "die": "dice",
    "human": "humans",
}
# Nouns whose plural is the same word (or that are already plural).
_INVARIANT = frozenset(
    {
        "sheep",
        "deer",
        "fish",
        "aircraft",
        "series",
        "species",
        "scissors",
        "glasses",
        "skis",
    }
)


def plural_forms(word: str) -> tuple[str, ...]:
    """Plural spellings of one lower-case English noun (may be empty for invariant nouns)."""
    if word in _IRREGULAR_PLURALS:
        return (_IRREGULAR_PLURALS[word],)
    if word in _INVARIANT:
        return ()
    if word.endswith("man"):  # man -> men, policeman -> policemen, woman -> women
        return (word[:-3] + "men",)
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return (word + "es",)
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return (word[:-1] + "ies",)
    if word.endswith("o"):  # photos / potatoes: accept both
        return (word + "s", word + "es")
    return (word + "s",)


def tokenize(text: str) -> list[tuple[str, int, int]]:
    """Lower-cased word tokens of `text` as (word, start, end) character offsets into `text`."""
    return [(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


@dataclass(frozen=True)
class Mention:
    """One object mention: canonical class, and where it sits in the text (char offsets)."""

    cls: str
    start: int
    end: int
    surface: str


class ObjectVocabulary:
    """Canonical object classes and the surface phrases that name them.

    Args:
        surface_forms: canonical class -> phrases that mean it. The class name itself is
            always a surface form. Phrases are case-insensitive and may span several words.
        on_conflict: what to do when one explicit phrase is listed under two classes:
            "error" raises ValueError; "first" keeps the first class (hand-written synonym
            tables such as CHAIR's repeat a few words).
        plurals: also accept the plural of each phrase's last word.
    """

    def __init__(
        self,
        surface_forms: Mapping[str, Iterable[str]],
        *,
        on_conflict: Literal["error", "first"] = "error",
        plurals: bool = True,
    ) -> None:
        explicit: dict[tuple[str, ...], str] = {}
        classes: list[str] = []
        for cls, phrases in surface_forms.items():
            if cls in classes:
                raise ValueError(f"class {cls!r} listed twice")
            classes.append(cls)
            for phrase in (cls, *phrases):
                key = tuple(w for w, _, _ in tokenize(phrase))
                if not key:
                    raise ValueError(f"empty surface phrase {phrase!r} for class {cls!r}")
                owner = explicit.get(key)
                if owner is not None and owner != cls and on_conflict == "error":
                    raise ValueError(f"phrase {phrase!r} names both {owner!r} and {cls!r}")
                explicit.setdefault(key, cls)
        table = dict(explicit)
        if plurals:
            # Generated plurals never override an explicit phrase, and the first one wins.
            for key, cls in explicit.items():
                for plural in plural_forms(key[-1]):
                    table.setdefault((*key[:-1], plural), cls)
        self._classes = tuple(classes)
        self._class_set = frozenset(classes)
        self._table = table
        self._max_words = max((len(k) for k in table), default=0)

    @property
    def classes(self) -> tuple[str, ...]:
        """Canonical class names, in the order they were given."""
        return self._classes

    def __contains__(self, cls: object) -> bool:
        return cls in self._class_set

    def __len__(self) -> int:
        return len(self._classes)

    def canonical(self, phrase: str) -> str | None:
        """Class named by exactly this phrase (whole phrase, plurals ok), or None."""
        return self._table.get(tuple(w for w, _, _ in tokenize(phrase)))

    def find_spans(self, text: str) -> list[Mention]:
        """All mentions in `text`, in order of appearance, longest match first, repeats kept."""
        tokens = tokenize(text)
        words = [w for w, _, _ in tokens]
        mentions: list[Mention] = []
        i = 0
        while i < len(words):
            for n in range(min(self._max_words, len(words) - i), 0, -1):
                cls = self._table.get(tuple(words[i : i + n]))
                if cls is not None:
                    start, end = tokens[i][1], tokens[i + n - 1][2]
                    mentions.append(Mention(cls, start, end, text[start:end]))
                    i += n
                    break
            else:
                i += 1
        return mentions

    def find_mentions(self, text: str) -> list[str]:
        """Canonical classes mentioned in `text`, in order of appearance, repeats kept."""
        return [m.cls for m in self.find_spans(text)]


def shapes_vocabulary() -> ObjectVocabulary:
    """ShapesWorld vocabulary: class "<colour> <shape>", surface forms colour x shape synonym.

    E.g. "red disc" and "red balls" both map to "red circle".
    """
    from mmalign.shapes.vocab import COLOURS, SHAPE_SYNONYMS, SHAPES

    return ObjectVocabulary(
        {
            f"{colour} {shape}": [f"{colour} {syn}" for syn in SHAPE_SYNONYMS[shape]]
            for colour in COLOURS
            for shape in SHAPES
        }
    )


def parse_synonyms(text: str) -> dict[str, list[str]]:
    """Parse a CHAIR-style synonyms table: one class per line, comma-separated, first canonical.

    Blank lines and lines starting with '#' are skipped; phrases are stripped and
    lower-cased, and the canonical name is normalised to single spaces.
    """
    table: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        phrases = [" ".join(p.lower().split()) for p in line.split(",")]
        phrases = [p for p in phrases if p]
        if not phrases:
            raise ValueError(f"synonyms line {lineno}: no phrases in {line!r}")
        cls, rest = phrases[0], phrases[1:]
        table.setdefault(cls, []).extend(rest)
    return table


def synonyms_vocabulary(text: str) -> ObjectVocabulary:
    """COCO-style vocabulary (e.g. Object HalBench / CHAIR `synonyms.txt`) from the table text.

    A phrase listed under two classes keeps the first class, as hand-made tables repeat words.
    """
    return ObjectVocabulary(parse_synonyms(text), on_conflict="first")


def load_synonyms_vocabulary(path: str | Path) -> ObjectVocabulary:
    """`synonyms_vocabulary` read from a UTF-8 file."""
    return synonyms_vocabulary(Path(path).read_text(encoding="utf-8"))


SHAPESWORLD = "shapesworld"


def load_vocabulary(spec: str) -> ObjectVocabulary:
    """`spec` "shapesworld" -> `shapes_vocabulary()`; anything else is a synonyms file
    (`synonyms_vocabulary` format) at a local path or s3:// URI (`mmalign.storage`).

    Raises ValueError naming `spec` when the file is not UTF-8 text or lists no class
    (`mmalign.storage.StorageError` when it cannot be read).
    """
    if spec == SHAPESWORLD:
        return shapes_vocabulary()
    from mmalign import storage

    try:
        vocab = synonyms_vocabulary(storage.read_bytes(spec).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{spec}: not a UTF-8 synonyms file ({err.reason})") from None
    except ValueError as err:
        raise ValueError(f"{spec}: {err}") from None
    if not len(vocab):
        raise ValueError(f"{spec}: no object classes (one class per line, synonyms after commas)")
    return vocab
