"""Bad-input corpora (issue 20): files that real datasets ship, each row's fate stated.

Every builder is a pure function of a directory: it writes the files there and returns a
`Corpus` with the URI to pass as `data.prompts` (bdhs.py) or `data.offline_pairs`
(offline_dpo.py), the ids that must be written exactly once and, per quarantined row, its
id and a fragment of the reason the quarantine must give. Grayscale, RGBA, palette and 1x1
images are good rows: every reader converts to RGB and the CLIP processor resizes any size.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

LONG_WORDS = 50_000  # far beyond any context here (the tiny model has 1024 positions)


@dataclass(frozen=True)
class Corpus:
    """uri: the input; good: ids written exactly once; bad: (id, reason fragment) per
    quarantined row (an id may appear in both: a duplicate's first row is good)."""

    uri: str
    good: frozenset[str]
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.good) + len(self.bad)


# ------------------------------------------------------------------ images


def png(mode: str = "RGB", size: tuple[int, int] = (24, 24), colour: Any = None) -> bytes:
    """An encoded PNG of `mode` (RGB, L, RGBA, P, ...) and `size`."""
    img = Image.new(mode, size, colour if colour is not None else _default_colour(mode))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _default_colour(mode: str) -> Any:
    return {"L": 128, "P": 3, "RGBA": (200, 30, 30, 90), "LA": (90, 200)}.get(mode, (200, 30, 30))


def huge_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header declares width x height pixels (a decompression bomb: 1.6 G pixels
    here) with no pixel data: PIL refuses it at open, before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


CORRUPT = b"\x89PNG\r\n\x1a\n" + b"this is not the rest of a PNG" * 4
GOOD_IMAGES = {  # name -> bytes; all good rows
    "rgb": png("RGB"),
    "gray": png("L", (20, 30)),
    "rgba": png("RGBA", (30, 20)),
    "palette": png("P", (16, 16)),
    "tiny": png("RGB", (1, 1)),
}
BAD_IMAGES = {  # name -> (bytes, reason fragment)
    "corrupt": (CORRUPT, "images: unreadable"),
    "empty": (b"", "images: unreadable"),
    "huge": (huge_png(), "DecompressionBomb"),
}


def _write_images(directory: Path) -> None:
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for name, data in GOOD_IMAGES.items():
        (directory / "images" / f"{name}.png").write_bytes(data)
    for name, (data, _) in BAD_IMAGES.items():
        (directory / "images" / f"{name}.png").write_bytes(data)


# ------------------------------------------------------------------ LLaVA prompts (bdhs.py)


def llava_row(rid: Any, image: str = "images/rgb.png", question: Any = None, answer: Any = None):
    """A LLaVA-instruct row; `question`/`answer` default to a short valid exchange."""
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {
                "from": "human",
                "value": "<image>\nWhat is in the picture?" if question is None else question,
            },
            {"from": "gpt", "value": "A red square. It is large." if answer is None else answer},
        ],
    }


def _line(row: Any) -> bytes:
    # ensure_ascii (the default) escapes a lone surrogate as \ud800: valid JSON, invalid text
    return json.dumps(row).encode()


def llava_jsonl(directory: Path) -> Corpus:
    """prompts.jsonl with every bad shape a LLaVA-instruct file carries, between good rows.

    One line per row; blank lines are skipped by the reader, so "row-N" ids count rows.
    """
    _write_images(directory)
    lines: list[bytes] = []
    good: set[str] = set()
    bad: list[tuple[str, str]] = []

    def add(line: bytes, rid: str | None = None, reason: str | None = None) -> None:
        lines.append(line)
        n = len(lines)
        if reason is None:
            assert rid is not None
            good.add(rid)
        else:
            bad.append((rid or f"line-{n}", reason))

    for name in GOOD_IMAGES:  # grayscale, RGBA, palette, 1x1: converted to RGB
        add(_line(llava_row(f"good-{name}", f"images/{name}.png")), f"good-{name}")
    add(_line(llava_row(7)), "7")  # an int id is an id
    add(_line(llava_row("dup")), "dup")
    add(_line(llava_row("dup", answer="Another answer.")), "dup", "id: duplicate")
    null_turn = {**llava_row("bad-null-turn"), "conversations": [None, {"from": "gpt"}]}
    add(_line(null_turn), "bad-null-turn", "conversations[0]: expected an object, got NoneType")
    str_turns = {**llava_row("bad-str-turns"), "conversations": "human: hi"}
    add(_line(str_turns), "bad-str-turns", "conversations: expected a list of turns, got str")
    add(_line("just a string"), f"row-{len(lines)}", "row: expected an object, got str")
    add(_line([1, 2]), f"row-{len(lines)}", "row: expected an object, got list")
    add(_line(llava_row("bad-int-value", question=7)), "bad-int-value", "expected text, got int")
    add(b'{"id": "bad-truncated", "image": ', reason="not valid JSON")
    latin = _line(llava_row("bad-latin1", answer="Un caf\u00e9 rouge.")).replace(
        b"\\u00e9", b"\xe9"
    )
    add(latin, reason="not UTF-8 at byte")
    surrogate = llava_row("bad-surrogate", question="<image>\nWhat \ud800 is there?")
    add(_line(surrogate), "bad-surrogate", "invalid Unicode")
    # the quarantine shows an id it cannot encode with a backslash escape (mmalign.io.printable)
    add(_line(llava_row("bad-id-\udc00")), "bad-id-\\udc00", "id: invalid Unicode")
    objects = {**llava_row("bad-surrogate-object"), "objects": ["cat", "d\ud83dg"]}
    add(_line(objects), "bad-surrogate-object", "objects: invalid Unicode")
    add(_line(llava_row("bad-empty-answer", answer="")), "bad-empty-answer", "reference: empty")
    long_q = "<image>\n" + "describe " * LONG_WORDS
    add(_line(llava_row("bad-long", question=long_q)), "bad-long", "prompt: too long")
    for name, (_, reason) in BAD_IMAGES.items():
        add(
            _line(llava_row(f"bad-image-{name}", f"images/{name}.png")), f"bad-image-{name}", reason
        )
    add(_line(llava_row("bad-missing-image", "images/nope.png")), "bad-missing-image", "images")
    path = directory / "prompts.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # a trailing blank line is no row
    return Corpus(str(path), frozenset(good), bad)


def latin1_json(directory: Path) -> tuple[str, int]:
    """A LLaVA JSON list saved as Latin-1: (uri, byte offset of the first non-UTF-8 byte).
    One document: it cannot be read at all, so the run fails naming the file and offset."""
    text = json.dumps([llava_row("a", answer="Un caf\u00e9.")], ensure_ascii=False)
    data = text.encode("latin-1")
    path = directory / "latin1.json"
    path.write_bytes(data)
    return str(path), data.index(b"\xe9")


def mostly_bad_llava(directory: Path) -> Corpus:
    """prompts.json: 1 good row, 4 bad ones (two kinds): a systematic error, not bad rows."""
    _write_images(directory)
    rows: list[Any] = [llava_row("good")]
    bad = []
    for i in range(3):
        rows.append({**llava_row(f"bad-turns-{i}"), "conversations": "human: hi"})
        bad.append((f"bad-turns-{i}", "conversations: expected a list of turns"))
    rows.append(llava_row("bad-int", question=3))
    bad.append(("bad-int", "expected text, got int"))
    path = directory / "prompts.json"
    path.write_text(json.dumps(rows))
    return Corpus(str(path), frozenset({"good"}), bad)


def mostly_bad_images(directory: Path) -> Corpus:
    """prompts.json the reader accepts whole, whose rows then fail in the BDHS operator:
    1 good row, 3 corrupt images, 1 empty answer (the guard counts them after generation)."""
    _write_images(directory)
    rows = [llava_row("good")]
    bad = []
    for i in range(3):
        rows.append(llava_row(f"bad-image-{i}", "images/corrupt.png"))
        bad.append((f"bad-image-{i}", "images: unreadable"))
    rows.append(llava_row("bad-empty-answer", answer=""))
    bad.append(("bad-empty-answer", "reference: empty"))
    path = directory / "prompts.json"
    path.write_text(json.dumps(rows))
    return Corpus(str(path), frozenset({"good"}), bad)


# ------------------------------------------------------------------ preference pairs


def _pair(rid: str, image: bytes | str, prompt: str = "What colour is the square?", **kw: Any):
    from mmalign.schema import preference_row

    args = {"chosen": "It is red.", "rejected": "It is blue.", **kw}
    return preference_row(
        id=rid, prompt=prompt, images=[image], source="test", method="bdhs", **args
    )


def preference_parquet(directory: Path) -> Corpus:
    """pairs.parquet (our schema): good pairs on every image mode, and bad ones. Text that
    is not UTF-8 or holds a lone surrogate cannot be in Parquet at all (Arrow refuses to
    write it), so those shapes live in the LLaVA corpus only."""
    from mmalign.io import write_preferences

    _write_images(directory)
    rows: list[dict[str, Any]] = []
    good: set[str] = set()
    bad: list[tuple[str, str]] = []
    for name, data in GOOD_IMAGES.items():
        rows.append(_pair(f"good-{name}", data))
        good.add(f"good-{name}")
    rows.append(_pair("good-path", "images/rgb.png"))  # relative to the Parquet's directory
    good.add("good-path")
    # offline_dpo re-reads pairs batch by batch, so it cannot keep "the first": both go
    rows.append(_pair("dup", GOOD_IMAGES["rgb"]))
    rows.append(_pair("dup", GOOD_IMAGES["gray"], chosen="It is grey."))
    bad += [("dup", "id: duplicate"), ("dup", "id: duplicate")]
    template = _pair("x", GOOD_IMAGES["rgb"])
    rows.append(dict(template, id="bad-empty-chosen", chosen=[]))
    bad.append(("bad-empty-chosen", "chosen: empty"))
    rows.append(dict(template, id="bad-empty-rejected", rejected=[]))
    bad.append(("bad-empty-rejected", "rejected: empty"))
    rows.append(dict(template, id="bad-null-message", prompt=[None]))
    bad.append(("bad-null-message", "prompt: expected a string or a list of messages"))
    rows.append(_pair("bad-long", GOOD_IMAGES["rgb"], prompt="describe " * LONG_WORDS))
    bad.append(("bad-long", "prompt: too long"))
    rows.append(_pair("bad-image-corrupt", CORRUPT))
    bad.append(("bad-image-corrupt", "images: unreadable image"))
    rows.append(_pair("bad-image-empty", "images/empty.png"))
    bad.append(("bad-image-empty", "is empty"))
    rows.append(_pair("bad-image-huge", "images/huge.png"))
    bad.append(("bad-image-huge", "DecompressionBomb"))
    rows.append(_pair("bad-image-missing", "images/nope.png"))
    bad.append(("bad-image-missing", "images: cannot read"))
    uri = str(directory / "pairs.parquet")
    write_preferences(rows, uri)
    return Corpus(uri, frozenset(good), bad)


def mostly_bad_parquet(directory: Path) -> Corpus:
    """pairs.parquet: 2 good pairs, 5 bad ones (empty chosen x3, corrupt image x2)."""
    from mmalign.io import write_preferences

    rows = [_pair("good-0", GOOD_IMAGES["rgb"]), _pair("good-1", GOOD_IMAGES["gray"])]
    bad = []
    for i in range(3):
        rows.append(dict(rows[0], id=f"bad-chosen-{i}", chosen=[]))
        bad.append((f"bad-chosen-{i}", "chosen: empty"))
    for i in range(2):
        rows.append(_pair(f"bad-image-{i}", CORRUPT))
        bad.append((f"bad-image-{i}", "images: unreadable image"))
    directory.mkdir(parents=True, exist_ok=True)
    uri = str(directory / "pairs.parquet")
    write_preferences(rows, uri)
    return Corpus(uri, frozenset({"good-0", "good-1"}), bad)
