"""Malformed input rows are quarantined with their reason, never end the read.

Each shape here was seen ending a run on main (issue 20): a `null` turn, a string instead
of the turn list, a row that is not an object, an int `value`, one bad JSONL line, a
Latin-1 line, a lone surrogate escaped in JSON. The good rows around them are kept.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from mmalign import io as mio


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


def _good(rid: str) -> dict:
    return {
        "id": rid,
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is there?"},
            {"from": "gpt", "value": "A red circle."},
        ],
    }


MALFORMED = [
    (
        {"id": "null-turn", "image": "a.png", "conversations": [None, {"from": "gpt"}]},
        "conversations[0]: expected an object, got NoneType",
    ),
    (
        {"id": "str-turns", "image": "a.png", "conversations": "human: hi"},
        "conversations: expected a list of turns, got str",
    ),
    (
        {"id": "int-value", "image": "a.png", "conversations": [{"from": "human", "value": 7}]},
        "conversations.human.value: expected text, got int",
    ),
    (
        {
            "id": "surrogate",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat \ud800 is there?"},
            ],
        },
        "conversations.human.value: invalid Unicode at character 13",
    ),
    (
        {
            "id": "bad-objects",
            "image": "a.png",
            "objects": "cat",
            **{"conversations": _good("x")["conversations"]},
        },
        "objects: expected a list, got str",
    ),
    (
        {"id": "int-image", "image": 3, "conversations": _good("x")["conversations"]},
        "image: expected a path, bytes or {bytes, path}, got 3",
    ),
]


@pytest.mark.parametrize(("row", "reason"), MALFORMED, ids=[r["id"] for r, _ in MALFORMED])
def test_malformed_llava_rows_are_quarantined_with_reason(
    tmp_path: Path, row: dict, reason: str
) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_good("ok-1"), row, _good("ok-2")]))
    good, bad = mio.read_prompts(str(path))
    assert [r["id"] for r in good] == ["ok-1", "ok-2"]
    assert bad == [{"id": row["id"], "reason": reason, "source": str(path)}]


def test_row_that_is_not_an_object_is_quarantined(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_good("ok"), "just a string", [1, 2]]))
    good, bad = mio.read_prompts(str(path))
    assert [r["id"] for r in good] == ["ok"]
    assert [(b["id"], b["reason"]) for b in bad] == [
        ("row-1", "row: expected an object, got str"),
        ("row-2", "row: expected an object, got list"),
    ]


def test_jsonl_bad_lines_cost_one_row_each(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    lines = [
        json.dumps(_good("ok-1")).encode(),
        b'{"id": "broken", "image": ',  # truncated JSON
        json.dumps({**_good("latin"), "id": "latin"}, ensure_ascii=False)
        .replace("circle", "caf\u00e9")
        .encode("latin-1"),  # not UTF-8
        b"",
        json.dumps(_good("ok-2")).encode(),
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    good, bad = mio.read_prompts(str(path))
    assert [r["id"] for r in good] == ["ok-1", "ok-2"]
    reasons = {b["id"]: b["reason"] for b in bad}
    assert set(reasons) == {"line-2", "line-3"}
    assert reasons["line-2"].startswith("line 2: not valid JSON")
    assert reasons["line-3"].startswith("line 3: not UTF-8 at byte ")


def test_undecodable_json_list_fails_naming_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    text = json.dumps([_good("ok")], ensure_ascii=False).replace("circle", "caf\u00e9")
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(ValueError, match=rf"data.json: not UTF-8 at byte offset {offset}$"):
        mio.read_prompts(str(path))
    path.write_text('[{"id": "a",')
    with pytest.raises(ValueError, match=r"data.json: not valid JSON at byte offset 12"):
        mio.read_prompts(str(path))


def test_online_prompt_source_quarantines_the_same_rows(tmp_path: Path) -> None:
    """The Ray Data reader of the online loop (locators -> load_prompt_rows, called here
    on a plain Arrow batch) keeps one output row per input row, the bad ones with reasons."""
    import pyarrow as pa

    from operators.prompt_source import load_prompt_rows, plan_locators

    (tmp_path / "a.png").write_bytes(_png())
    rows = [_good("ok-1"), *(r for r, _ in MALFORMED), "not an object", _good("ok-2")]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r).encode() for r in rows] + [b"{broken"]
    path.write_bytes(b"\n".join(lines))
    out = load_prompt_rows(pa.Table.from_pylist(plan_locators(str(path)))).to_pylist()
    assert len(out) == len(rows) + 1
    errors = {r["id"]: r["error"] for r in out if r["error"]}
    assert [r["id"] for r in out if not r["error"]] == ["ok-1", "ok-2"]
    for row, reason in MALFORMED:
        assert reason in errors[row["id"]]
    assert "row: expected an object, got str" in errors[f"row-{len(rows) - 2}"]
    assert "not valid JSON" in errors[f"line-{len(rows) + 1}"]
