"""Row references (mmalign.rows): importable without Ray, resolved inside a Ray process.

The prompt source itself (Ray Data blocks, quarantine) is tested in
test_online_source_on_cpu.py; here the references and resolvers on hand-made blocks.
"""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

from mmalign.rows import PromptSource, RowRef, resolve_pairs, resolve_rows


def test_importing_the_row_contracts_needs_no_ray() -> None:
    code = "import sys, mmalign.rows, mmalign.schema; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rows_without_refs_pass_unchanged_without_ray() -> None:
    rows = [{"image": b"png", "prompt": "Q?", "chosen": "a", "rejected": "b"}]
    out = resolve_pairs(rows)  # type: ignore[arg-type]
    assert out == rows and out[0] is not rows[0]  # copied: the caller's row stays as it was
    assert resolve_rows([]) == []
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_prompt_source_hands_out_refs_by_table_position() -> None:
    source = PromptSource(blocks=["b0", "b1"], table=[(0, 1, 3), (5, 0, 0)], ids=["x", "y"])
    assert len(source) == 2
    assert source.refs([1, 0, 1]) == [RowRef("b0", 0), RowRef("b1", 3), RowRef("b0", 0)]


@pytest.mark.ray
def test_pairs_get_the_image_and_prompt_of_their_ref_in_a_ray_task() -> None:
    import ray

    from actors.runtime import init_ray

    init_ray(local_cpus=2)
    try:
        block = ray.put(
            pa.Table.from_pylist(
                [
                    {"id": "r0", "prompt": "first?", "images": [{"bytes": b"0", "path": None}]},
                    {"id": "r1", "prompt": "second?", "images": [{"bytes": b"1", "path": "p"}]},
                ]
            )
        )
        online = {"id": "r1@s0v1", "image": RowRef(block, 1), "prompt": "", "chosen": "a"}
        offline = {"id": "o", "image": b"png", "prompt": "offline?", "chosen": "c"}
        got = ray.get(ray.remote(resolve_pairs).remote([online, offline, online]))
    finally:
        ray.shutdown()
    assert [(r["image"], r["prompt"]) for r in got] == [
        ({"bytes": b"1", "path": "p"}, "second?"),
        (b"png", "offline?"),
        ({"bytes": b"1", "path": "p"}, "second?"),
    ]
    assert got[0]["id"] == "r1@s0v1" and got[0]["chosen"] == "a"  # the rest is kept
